"""``dino import --name`` / ``--url``: official DINO backbones downloaded into a cache, resumed after a
cut connection, never reused when corrupt, and a one-line error without network.

Every download comes from a local HTTP server on 127.0.0.1 that lays files out as the official host
does (``BASE/<release>/<file>``), reached through ``DINO_IMPORT_MIRROR``: no test reaches the internet.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from dino import cli
from dino.model_folder import METADATA_FILE
from tests.helpers import LOOPBACK, free_port
from training.backbone import build_backbone
from training.download import (
    CACHE_ENV,
    MIRROR_ENV,
    OFFICIAL_BASE_URL,
    OFFICIAL_WEIGHTS,
    PART_SUFFIX,
    cache_path,
    download,
    mirror_url,
    official_for_url,
    official_url,
)
from training.import_weights import load_downloaded_weights
from training.weights import FORMAT_OFFICIAL_BACKBONE

TINY_ARCH, TINY_PATCH, TINY_SIZE = "vit_tiny", 16, 64
VITS16 = OFFICIAL_WEIGHTS["dino_vits16"]
#: a small image size for the end-to-end import: the export is what takes the time
EXPORT_SIZE = 32


class FileServer:
    """An HTTP server on 127.0.0.1 serving ``files`` (URL path -> bytes), with HTTP Range support.

    ``cut_next``: paths whose next response announces the whole file but sends only half of it and
    closes the connection. ``honour_range``: False answers every request with the whole file (200).
    ``requests`` records (path, Range header) for every request.
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.cut_next: set[str] = set()
        self.honour_range = True
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the name http.server calls
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                range_header = self.headers.get("Range")
                if range_header and server.honour_range:
                    start = int(range_header.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_error(416, "Range Not Satisfiable")
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if self.path in server.cut_next:
                    server.cut_next.discard(self.path)
                    body = body[: len(body) // 2]
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.httpd.server_address[1]}"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def tiny_file() -> bytes:
    """A vit_tiny/16 backbone in the official "backbone only" layout: a bare state dict, torch.save'd."""
    torch.manual_seed(5)
    buffer = io.BytesIO()
    torch.save(build_backbone(TINY_ARCH, TINY_PATCH, TINY_SIZE).state_dict(), buffer)
    return buffer.getvalue()


@pytest.fixture()
def env(tmp_path, monkeypatch) -> Path:
    """A private cache folder (``DINO_CACHE_DIR``) and no mirror unless a test sets one."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    return cache


@pytest.fixture()
def served(tiny_file, env, monkeypatch) -> Iterator[tuple[FileServer, str]]:
    """The tiny file served at ``/tiny/dino_tiny.pth``; yields (server, URL)."""
    with FileServer({"/tiny/dino_tiny.pth": tiny_file}) as server:
        yield server, f"{server.base}/tiny/dino_tiny.pth"


def test_official_names_and_urls_follow_the_reference_readme(monkeypatch):
    assert sorted(OFFICIAL_WEIGHTS) == ["dino_vitb16", "dino_vitb8", "dino_vits16", "dino_vits8"]
    assert official_url(VITS16) == (
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
    )
    assert (VITS16.arch, VITS16.patch_size) == ("vit_small", 16)
    assert {(w.arch, w.patch_size) for w in OFFICIAL_WEIGHTS.values()} == {
        ("vit_small", 16),
        ("vit_small", 8),
        ("vit_base", 16),
        ("vit_base", 8),
    }
    monkeypatch.setenv(MIRROR_ENV, "http://mirror.internal/dino/")
    assert mirror_url(official_url(VITS16)) == (
        "http://mirror.internal/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
    )
    assert mirror_url("https://example.org/x.pth") == "https://example.org/x.pth"  # other hosts untouched
    assert official_for_url("https://example.org/any/dino_vitbase8_pretrain.pth") == OFFICIAL_WEIGHTS["dino_vitb8"]
    assert official_for_url("https://example.org/other.pth") is None
    # the cache is keyed by the official layout, whichever mirror served the file
    assert cache_path(official_url(VITS16), Path("/c")) == Path(
        "/c/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
    )
    assert OFFICIAL_BASE_URL.startswith("https://")


def test_download_into_the_cache_then_a_cache_hit_makes_no_request(served, tiny_file, capsys):
    server, url = served
    backbone, provenance = load_downloaded_weights(url, TINY_ARCH, TINY_PATCH, TINY_SIZE, progress=False)
    path = Path(provenance["source"])
    assert path.read_bytes() == tiny_file and not path.with_name(path.name + PART_SUFFIX).exists()
    assert provenance["source_url"] == url and provenance["source_format"] == FORMAT_OFFICIAL_BACKBONE
    assert len(server.requests) == 1
    assert "downloading" in capsys.readouterr().err

    load_downloaded_weights(url, TINY_ARCH, TINY_PATCH, TINY_SIZE, progress=False)
    assert len(server.requests) == 1  # served from the cache
    assert "using the cached" in capsys.readouterr().err


def test_a_cut_connection_is_resumed_with_a_range_request(served, tiny_file, env, capsys):
    server, url = served
    server.cut_next.add("/tiny/dino_tiny.pth")
    dest = env / "resume" / "dino_tiny.pth"
    download(url, dest, progress=False)
    assert dest.read_bytes() == tiny_file
    half = len(tiny_file) // 2
    assert server.requests == [("/tiny/dino_tiny.pth", None), ("/tiny/dino_tiny.pth", f"bytes={half}-")]
    assert "download interrupted (connection closed after" in capsys.readouterr().err


def test_a_partial_file_of_an_earlier_run_is_resumed(served, tiny_file, env):
    server, url = served
    dest = env / "earlier" / "dino_tiny.pth"
    dest.parent.mkdir(parents=True)
    dest.with_name(dest.name + PART_SUFFIX).write_bytes(tiny_file[:1000])
    download(url, dest, progress=False)
    assert dest.read_bytes() == tiny_file
    assert server.requests == [("/tiny/dino_tiny.pth", "bytes=1000-")]


def test_a_server_without_range_support_sends_the_whole_file_again(served, tiny_file, env):
    server, url = served
    server.honour_range = False
    dest = env / "norange" / "dino_tiny.pth"
    dest.parent.mkdir(parents=True)
    dest.with_name(dest.name + PART_SUFFIX).write_bytes(b"x" * 1000)  # would corrupt the file if appended to
    download(url, dest, progress=False)
    assert dest.read_bytes() == tiny_file


def test_a_corrupt_cached_file_is_deleted_and_downloaded_again(served, tiny_file, env, capsys):
    server, url = served
    _, provenance = load_downloaded_weights(url, TINY_ARCH, TINY_PATCH, TINY_SIZE, progress=False)
    cached = Path(provenance["source"])
    cached.write_bytes(tiny_file[: len(tiny_file) // 3])  # e.g. a disk error, or a copy cut short
    capsys.readouterr()
    load_downloaded_weights(url, TINY_ARCH, TINY_PATCH, TINY_SIZE, progress=False)
    assert "the cached file is unreadable" in capsys.readouterr().err
    assert len(server.requests) == 2 and cached.read_bytes() == tiny_file


def _import(*args: str) -> int:
    return cli.main(["import", "--quiet", *args])


def test_a_corrupt_download_is_refused_clearly_and_not_kept(env, capsys, tmp_path):
    with FileServer({"/x/garbage.pth": b"<html>mirror error page</html>"}) as server:
        url = f"{server.base}/x/garbage.pth"
        out = tmp_path / "models" / "garbage"
        args = ["--url", url, "--arch", TINY_ARCH, "--patch-size", str(TINY_PATCH), "--output", str(out)]
        assert _import(*args) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert f"dino import: the file downloaded from {url} is unreadable and was deleted" in err
        assert not cache_path(url, env).exists() and not out.exists()
        assert _import(*args) == 1  # not reused: downloaded again, refused again
        assert len(server.requests) == 2


def test_without_network_a_one_line_error_says_how_to_use_a_local_file(env, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, f"http://{LOOPBACK}:{free_port()}")  # nothing listens there
    out = tmp_path / "models" / "offline"
    assert _import("--name", "dino_vits16", "--output", str(out)) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dino import:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "cannot download" in lines[0] and "Connection refused" in lines[0]
    assert "dino import --weights dino_deitsmall16_pretrain.pth --arch vit_small --patch-size 16" in lines[0]
    assert not out.exists()


def test_http_errors_and_bad_flag_combinations(served, capsys, tmp_path):
    server, url = served
    out = str(tmp_path / "models" / "m")
    assert (
        _import(
            "--url", url.replace("dino_tiny", "missing"), "--arch", TINY_ARCH, "--patch-size", "16", "--output", out
        )
        == 1
    )
    assert "HTTP 404" in capsys.readouterr().err
    assert _import("--url", url, "--output", out) == 2  # an unknown file: the architecture must be given
    assert "needs --arch and --patch-size" in capsys.readouterr().err
    assert _import("--name", "dino_vits16", "--arch", "vit_base", "--output", out) == 2
    assert "dino_vits16 is vit_small/16, not --arch vit_base" in capsys.readouterr().err
    assert len(server.requests) == 1  # only the 404


@pytest.mark.slow  # a ViT-S/16 state dict (88 MB) and a real ONNX export
def test_import_by_name_from_a_mirror(env, capsys, tmp_path, monkeypatch):
    torch.manual_seed(11)
    state = build_backbone(VITS16.arch, VITS16.patch_size, 224).state_dict()
    official = tmp_path / "official.pth"
    torch.save(state, official)
    with FileServer({f"/{VITS16.path}": official.read_bytes()}) as server:
        server.cut_next.add(f"/{VITS16.path}")  # and resumed on the way
        monkeypatch.setenv(MIRROR_ENV, server.base)
        out = tmp_path / "models" / "dino-vits16"
        rc = _import("--name", "dino_vits16", "--image-size", str(EXPORT_SIZE), "--output", str(out))
        printed = capsys.readouterr()
        assert rc == 0, printed.err
        assert len(server.requests) == 2
    assert f"imported {server.base}/{VITS16.path}" in printed.out and "onnx.checker passed" in printed.out
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["name"] == "dino-vits16" and meta["arch"] == "vit_small" and meta["patch_size"] == 16
    assert meta["provenance"]["release"] == "dino_vits16"
    assert meta["provenance"]["source_url"] == f"{server.base}/{VITS16.path}"
    assert Path(meta["provenance"]["source"]) == cache_path(official_url(VITS16), env)
