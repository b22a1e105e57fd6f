"""``dino.client`` against real servers: ``dino serve`` on 127.0.0.1 (one with an API key, one
without, each shared by the module), and tiny scripted HTTP servers for the retry rules (a 503 with
``Retry-After``, a connection reset after the request was read)."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from dino.client import (
    AsyncDinoClient,
    AttentionResult,
    DinoAPIError,
    DinoClient,
    EmbedResult,
    RetryPolicy,
    detail_text,
    parse_retry_after,
)
from tests.helpers import LOOPBACK, ServerProcess
from tests.service.images import photo_paths

API_KEY = "client-test-key"
DIM = 192  # the test model: ViT-Tiny/8 at 64 px
GRID = (8, 8)
HEADS = 3
UNKNOWN_ID = "0" * 32


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------------------------------
# real servers (started once per module)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    return photo_paths()[:4]  # before any server: a skip here must not leak a process


def _serve(model_dir: Path, log_dir: Path, api_key: str | None) -> ServerProcess:
    env = {"DINO_API_KEY": api_key, "DINO_INDEX_DIR": None, "DINO_WARMUP_BATCHES": "1"}
    return ServerProcess(model_dir, log_dir / "server.log", env=env).start()


@pytest.fixture(scope="module")
def keyed_server(photos, model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    server = _serve(model_dir, tmp_path_factory.mktemp("client-keyed"), API_KEY)
    yield server
    if not server.stop():
        server.kill()


@pytest.fixture(scope="module")
def open_server(photos, model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    server = _serve(model_dir, tmp_path_factory.mktemp("client-open"), None)
    yield server
    if not server.stop():
        server.kill()


@pytest.fixture
def client(keyed_server) -> Iterator[DinoClient]:
    with DinoClient(keyed_server.url, api_key=API_KEY, timeout=30) as dino:
        yield dino


def test_embed_of_every_input_kind_agrees(client, photos):
    path = photos[0]
    with Image.open(path) as img:
        pil = img.convert("RGB")
    array = np.asarray(pil)
    result = client.embed([path, str(path), path.read_bytes(), pil, array])
    assert isinstance(result, EmbedResult) and result.model == client.ready().model
    assert result.dim == DIM and result.embeddings.shape == (5, DIM) and result.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
    from_path, from_str, from_bytes, from_pil, from_array = result.embeddings
    assert np.abs(from_path - from_bytes).max() <= 1e-5 and np.abs(from_path - from_str).max() <= 1e-5
    assert np.abs(from_pil - from_array).max() <= 1e-5  # the same pixels, the same PNG
    assert cosine(from_path, from_pil) > 0.999 and cosine(from_path, from_array) > 0.999

    # one image, not in a list; raw embeddings and patch tokens
    single = client.embed(path.read_bytes(), normalize=False, patch_tokens=True)
    assert single.embeddings.shape == (1, DIM) and single.patch_tokens is not None
    assert single.patch_tokens.shape == (1, GRID[0] * GRID[1], DIM) and single.patch_tokens.dtype == np.float32
    raw = single.embeddings[0]
    assert abs(float(np.linalg.norm(raw)) - 1.0) > 1e-3  # not normalised
    assert np.abs(raw / np.linalg.norm(raw) - from_path).max() <= 1e-5

    # grey: an H x W array and a PIL "L" image are the same pixels; RGBA is composited like the server does
    grey = pil.convert("L")
    grey_result = client.embed((np.asarray(grey), grey, np.asarray(grey)[:, :, None]))
    assert np.abs(grey_result.embeddings[0] - grey_result.embeddings[1]).max() <= 1e-5
    assert np.abs(grey_result.embeddings[0] - grey_result.embeddings[2]).max() <= 1e-5
    rgba = np.dstack([array, np.full(array.shape[:2], 255, np.uint8)])
    assert cosine(client.embed(rgba).embeddings[0], from_array) > 0.9999


def test_attention_png_and_json(client, photos):
    png = client.attention(photos[1], threshold=0.6)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as overlay:
        assert overlay.size == (64, 64)

    with Image.open(photos[1]) as img:
        answer = client.attention(img, head=2, threshold=0.6, format="json")
    assert isinstance(answer, AttentionResult)
    assert answer.grid == GRID and answer.heads == HEADS and answer.head == 2
    assert answer.attention.shape == GRID and answer.attention.dtype == np.float32
    assert answer.mask is not None and answer.mask.dtype == bool and answer.mask.shape == GRID and answer.mask.any()

    mean = client.attention(photos[1].read_bytes(), format="json")
    assert mean.head == "mean" and mean.mask is None and (mean.attention >= 0).all()

    with pytest.raises(DinoAPIError) as error:
        client.attention(photos[1], head=HEADS)  # heads are 0..HEADS-1
    assert error.value.status == 422 and "head" in error.value.message


def test_gallery_round_trip(client, photos):
    labels = ["tench", None, "[draft] third"]  # a label that looks like a JSON list is still one label
    metadata = [{"source": "garden", "n": 1}, None, {"nested": {"ok": True}}]
    before = client.info().size
    ids = client.add(photos[:3], labels=labels, metadata=metadata)
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)
    with Image.open(photos[3]) as img:
        (extra,) = client.add(np.asarray(img.convert("RGB")), labels="one", metadata={"k": "v"})
    ids.append(extra)
    labels.append("one")
    metadata.append({"k": "v"})

    info = client.info()
    assert info.size == before + 4 and info.dim == DIM and info.backend == "faiss" and not info.read_only
    page = client.items(offset=before, limit=10)
    assert page.total == before + 4 and page.offset == before
    assert [(i.id, i.label, i.metadata) for i in page.items] == list(zip(ids, labels, metadata, strict=True))
    assert [i.id for i in client.iter_items(page_size=3)][before:] == ids  # pages of 3: across a page boundary

    found = client.neighbors(photos[1], k=2)
    assert found[0].id == ids[1] and found[0].score == pytest.approx(1.0, abs=1e-4) and found[0].label is None
    near = {n.id: n for n in client.neighbors_of(ids[0], k=10)}
    assert set(near) == set(ids[1:]) if before == 0 else ids[0] not in near  # itself excluded
    assert near[ids[2]].label == labels[2] and near[ids[2]].metadata == metadata[2]

    assert client.image(ids[0]).startswith(b"\xff\xd8")  # JPEG
    assert client.attention_of(ids[0]).startswith(b"\x89PNG")
    stored = client.attention_of(ids[0], head=0, format="json")
    assert stored.grid == GRID and stored.head == 0

    client.delete(ids[2])
    for gone in (lambda: client.delete(ids[2]), lambda: client.image(ids[2]), lambda: client.neighbors_of(ids[2])):
        with pytest.raises(DinoAPIError) as error:
            gone()
        assert error.value.status == 404 and ids[2] in error.value.message
    assert ids[2] not in [i.id for i in client.iter_items()]
    for image_id in (ids[0], ids[1], ids[3]):
        client.delete(image_id)
    assert client.info().size == before


def test_errors_carry_status_and_detail(client, keyed_server, photos):
    with DinoClient(keyed_server.url) as anonymous, DinoClient(keyed_server.url, api_key="wrong") as wrong:
        assert anonymous.health() and anonymous.ready().status == "ready"  # the probes need no key
        for dino in (anonymous, wrong):
            with pytest.raises(DinoAPIError) as error:
                dino.embed(photos[0])
            assert error.value.status == 401 and "API key" in error.value.message
            assert str(error.value).startswith("HTTP 401 (POST ")

    with pytest.raises(DinoAPIError) as error:
        client.neighbors_of(UNKNOWN_ID)
    assert error.value.status == 404 and isinstance(error.value.detail, str)

    # invalid parameters: FastAPI's validation errors are a list today, a string once flattened
    for bad in (lambda: client.neighbors_of(UNKNOWN_ID, k=0), lambda: client.items(offset=-1)):
        with pytest.raises(DinoAPIError) as error:
            bad()
        assert error.value.status == 422 and isinstance(error.value.detail, (str, list)) and error.value.message
    with pytest.raises(DinoAPIError) as error:
        client.image("not-an-id/../../index")  # quoted into one path segment, refused by the id pattern
    assert error.value.status in (404, 422)
    with pytest.raises(DinoAPIError) as error:
        client.embed(b"not an image")
    assert error.value.status == 415

    # caught before anything is sent
    with pytest.raises(ValueError, match="labels"):
        client.add(photos[:2], labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="uint8"):
        client.embed(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="no image"):
        client.embed([])
    with pytest.raises(TypeError):
        client.embed(42)  # type: ignore[arg-type]


def test_async_client(open_server, photos):
    async def main() -> None:
        async with AsyncDinoClient(open_server.url, timeout=30) as dino:
            assert await dino.health() and (await dino.wait_ready(5)).status == "ready"
            result = await dino.embed([photos[0], photos[0].read_bytes(), Image.open(photos[0])])
            assert result.embeddings.shape == (3, DIM)
            assert np.abs(result.embeddings[0] - result.embeddings[1]).max() <= 1e-5
            assert cosine(result.embeddings[0], result.embeddings[2]) > 0.999
            answer = await dino.attention(photos[1], format="json", threshold=0.5)
            assert answer.grid == GRID and answer.mask is not None
            ids = await dino.add(photos[:2], labels=["a", "b"])
            near = await dino.neighbors_of(ids[0], k=1)
            assert [n.id for n in near] == [ids[1]] and near[0].label == "b"
            assert [n.id for n in await dino.neighbors(photos[1], k=1)] == [ids[1]]
            assert [item.id async for item in dino.iter_items(page_size=1)] == ids
            assert (await dino.image(ids[1])).startswith(b"\xff\xd8")
            assert (await dino.attention_of(ids[1])).startswith(b"\x89PNG")
            await dino.delete(ids[0])
            with pytest.raises(DinoAPIError) as error:
                await dino.delete(ids[0])
            assert error.value.status == 404
            assert (await dino.info()).size == 1 and (await dino.items()).items[0].id == ids[1]

    asyncio.run(main())
    # the same embedding as the sync client's
    with DinoClient(open_server.url) as dino:
        assert dino.embed(photos[0]).dim == DIM


# --------------------------------------------------------------------------------------------------
# retries, against scripted local servers
# --------------------------------------------------------------------------------------------------

EMBED_BODY = {"model": "scripted", "dim": 2, "embeddings": [[0.6, 0.8]]}


class ScriptedServer:
    """An HTTP server on 127.0.0.1 answering each request with the next step of a script: ``"reset"``
    (read the request, then reset the connection without an answer) or ``(status, headers, body)``.
    The last step repeats. ``requests`` lists ``(method, path, monotonic time)`` of every request."""

    def __init__(self, *steps) -> None:
        self.steps = list(steps)
        self.requests: list[tuple[str, str, float]] = []
        script = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                script.requests.append((self.command, self.path, time.monotonic()))
                step = script.steps[min(len(script.requests), len(script.steps)) - 1]
                if step == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()  # RST
                    self.close_connection = True
                    return
                status, headers, body = step
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, format, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.httpd.handle_error = lambda request, address: None  # the reset socket's cleanup errors
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.httpd.server_address[1]}"

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


BUSY = (503, {"Retry-After": "1"}, {"detail": "inference queue full (9 images waiting); retry later"})


def test_a_503_is_retried_after_retry_after():
    with ScriptedServer(BUSY, (200, {}, EMBED_BODY)) as server, DinoClient(server.url) as dino:
        started = time.monotonic()
        result = dino.embed(b"any image")
        assert time.monotonic() - started >= 1.0
        assert (
            len(server.requests) == 2
            and [r[:2] for r in server.requests] == [("POST", "/embed?normalize=true&patch_tokens=false")] * 2
        )
        assert server.requests[1][2] - server.requests[0][2] >= 1.0
        np.testing.assert_array_equal(result.embeddings, np.array([[0.6, 0.8]], dtype=np.float32))


def test_async_client_retries_a_503_and_index_adds_too():
    async def main(url: str) -> list[str]:
        async with AsyncDinoClient(url) as dino:
            return await dino.add(b"any image", labels="x")

    with ScriptedServer(BUSY, (200, {}, {"ids": ["a" * 32]})) as server:
        started = time.monotonic()
        assert asyncio.run(main(server.url)) == ["a" * 32]
        assert time.monotonic() - started >= 1.0 and len(server.requests) == 2  # refused before acting: safe


def test_a_retry_after_past_the_wait_budget_is_not_waited_for():
    busy_long = (503, {"Retry-After": "100"}, {"detail": "gallery unavailable"})
    with ScriptedServer(busy_long) as server, DinoClient(server.url, retry=RetryPolicy(max_wait=5)) as dino:
        started = time.monotonic()
        with pytest.raises(DinoAPIError) as error:
            dino.info()
        assert time.monotonic() - started < 5 and len(server.requests) == 1
        assert (
            error.value.status == 503 and error.value.retry_after == 100 and error.value.detail == "gallery unavailable"
        )
    # attempts are bounded too
    with ScriptedServer((503, {"Retry-After": "0"}, {"detail": "busy"})) as server:
        with DinoClient(server.url, retry=RetryPolicy(max_attempts=3)) as dino, pytest.raises(DinoAPIError):
            dino.info()
        assert len(server.requests) == 3


def test_index_add_is_never_resent_after_a_connection_reset():
    fast = RetryPolicy(max_attempts=3, backoff=0.01)
    with ScriptedServer("reset") as server, DinoClient(server.url, retry=fast) as dino:
        with pytest.raises(httpx.TransportError):
            dino.add(b"any image", labels="x")
        assert [r[:2] for r in server.requests] == [("POST", "/index")]
        # a request without side effects is sent again (and fails again here)
        with pytest.raises(httpx.TransportError):
            dino.embed(b"any image")
        assert len(server.requests) == 1 + 3


def test_a_retried_delete_that_finds_the_image_gone_is_done():
    gone = (404, {}, {"detail": f"no gallery image with id '{UNKNOWN_ID}'"})
    with ScriptedServer("reset", gone) as server, DinoClient(server.url) as dino:
        dino.delete(UNKNOWN_ID)  # the first attempt's answer was lost: it deleted the image
        assert [r[:2] for r in server.requests] == [("DELETE", f"/index/{UNKNOWN_ID}")] * 2
        with pytest.raises(DinoAPIError) as error:
            dino.delete(UNKNOWN_ID)  # a plain 404 is still an error
        assert error.value.status == 404


def test_retry_after_and_detail_parsing():
    assert parse_retry_after("2") == 2.0 and parse_retry_after(" 0.5 ") == 0.5 and parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)
    validation = [{"loc": ["query", "k"], "msg": "Input should be greater than or equal to 1", "type": "x"}]
    assert detail_text(validation) == "query.k: Input should be greater than or equal to 1"
    assert detail_text("plain") == "plain" and detail_text({"a": 1}) == '{"a": 1}'
