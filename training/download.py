"""The official DINO backbones by name, downloaded once into a cache, resumable (``dino import --name``).

Caron et al. 2021 released their pretrained backbones at ``https://dl.fbaipublicfiles.com/dino``
(listed in the README of facebookresearch/dino). :data:`OFFICIAL_WEIGHTS` names the four ViT
"backbone only" files; ``dino import --name dino_vits16`` fetches one and converts it as
``dino import --weights FILE`` does.

- Cache: ``$DINO_CACHE_DIR`` (or ``--cache-dir``), default ``~/.cache/dino``; an official file lives
  at ``CACHE/<release>/<file>``, any other URL at ``CACHE/url-<hash>/<file>``. A file is placed there
  only once complete (it is written to ``<file>.part`` first), so a cache hit never re-downloads.
- Resume: an interrupted transfer keeps its ``.part`` file; the next attempt (up to
  :data:`DOWNLOAD_ATTEMPTS` per command, and any later run) asks for the rest with an HTTP ``Range``
  request, and starts over when the server does not honour it.
- Mirror: ``DINO_IMPORT_MIRROR=BASE`` fetches ``BASE/<release>/<file>`` instead of the official host
  (an internal mirror with the same layout); the cache is shared with the official URLs.

Only the standard library's ``urllib`` is used: no dependency beyond what the project has.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

#: where the reference repository's README points for the pretrained weights
OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/dino"
#: an internal mirror with the official layout, BASE/<release>/<file>
MIRROR_ENV = "DINO_IMPORT_MIRROR"
#: the download cache (overridden by --cache-dir)
CACHE_ENV = "DINO_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/dino"
#: suffix of a file being downloaded; it becomes the cached file only once complete
PART_SUFFIX = ".part"
#: cache folder prefix of files downloaded from URLs other than the official ones
URL_CACHE_PREFIX = "url-"
#: hex digits of the URL's sha256 in that folder's name
URL_HASH_CHARS = 16
#: attempts per command: an interrupted transfer is resumed this many times before giving up
DOWNLOAD_ATTEMPTS = 3
#: seconds without progress on a connection before it counts as interrupted
DOWNLOAD_TIMEOUT_S = 30.0
CHUNK_BYTES = 1 << 20
USER_AGENT = "dino-platform (dino import)"
HTTP_PARTIAL_CONTENT = 206
HTTP_RANGE_NOT_SATISFIABLE = 416
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class OfficialWeights:
    """One official DINO backbone release: its name here, architecture, and place on the server."""

    name: str  #: what ``--name`` accepts
    arch: str  #: this project's architecture name
    patch_size: int
    release: str  #: folder on the official server
    filename: str  #: the "backbone only" file in it

    @property
    def path(self) -> str:
        return f"{self.release}/{self.filename}"


#: the ViT backbones of the reference README's "Pretrained models" table (backbone-only files)
OFFICIAL_WEIGHTS: dict[str, OfficialWeights] = {
    w.name: w
    for w in (
        OfficialWeights("dino_vits16", "vit_small", 16, "dino_deitsmall16_pretrain", "dino_deitsmall16_pretrain.pth"),
        OfficialWeights("dino_vits8", "vit_small", 8, "dino_deitsmall8_pretrain", "dino_deitsmall8_pretrain.pth"),
        OfficialWeights("dino_vitb16", "vit_base", 16, "dino_vitbase16_pretrain", "dino_vitbase16_pretrain.pth"),
        OfficialWeights("dino_vitb8", "vit_base", 8, "dino_vitbase8_pretrain", "dino_vitbase8_pretrain.pth"),
    )
}


class DownloadError(Exception):
    """A download that cannot complete now: no network, an HTTP error, too many interruptions."""


class _Interrupted(Exception):
    """A transfer that stopped early; the ``.part`` file keeps what arrived."""


def official_url(weights: OfficialWeights) -> str:
    """The official URL of a release (the cache key, whatever mirror serves it)."""
    return f"{OFFICIAL_BASE_URL}/{weights.path}"


def mirror_url(url: str) -> str:
    """``url`` with the official host replaced by ``$DINO_IMPORT_MIRROR``, when that is set."""
    mirror = os.environ.get(MIRROR_ENV, "").strip().rstrip("/")
    prefix = OFFICIAL_BASE_URL + "/"
    if mirror and url.startswith(prefix):
        return f"{mirror}/{url[len(prefix) :]}"
    return url


def official_for_url(url: str) -> OfficialWeights | None:
    """The official release whose file ``url`` names (by its last path segment), if any."""
    filename = urlsplit(url).path.rsplit("/", 1)[-1]
    return next((w for w in OFFICIAL_WEIGHTS.values() if w.filename == filename), None)


def cache_root(flag: str | None = None) -> Path:
    """``--cache-dir``, else ``$DINO_CACHE_DIR``, else ``~/.cache/dino``."""
    return Path(flag or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def cache_path(url: str, root: Path) -> Path:
    """Where the file of ``url`` is cached: official files by release, others by a hash of the URL."""
    prefix = OFFICIAL_BASE_URL + "/"
    if url.startswith(prefix):
        return root.joinpath(*url[len(prefix) :].split("/"))
    filename = urlsplit(url).path.rsplit("/", 1)[-1] or "weights.pth"
    digest = hashlib.sha256(url.encode()).hexdigest()[:URL_HASH_CHARS]
    return root / f"{URL_CACHE_PREFIX}{digest}" / filename


def offline_hint(url: str, arch: str | None, patch_size: int | None) -> str:
    """How to import the same weights from a local file."""
    filename = urlsplit(url).path.rsplit("/", 1)[-1] or "FILE"
    arch_text = arch or "ARCH"
    patch_text = str(patch_size) if patch_size else "PATCH"
    return (
        f"download {url} by other means and run: "
        f"dino import --weights {filename} --arch {arch_text} --patch-size {patch_text} --output ..."
    )


def download(url: str, dest: Path, *, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming interrupted transfers.

    Returns ``dest``. Raises :class:`DownloadError` for network errors before any data (no network,
    refused, DNS), HTTP errors, or when :data:`DOWNLOAD_ATTEMPTS` attempts were all interrupted (the
    ``.part`` file stays, and the next run resumes from it).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    reason = ""
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            _transfer(url, part, progress)
        except _Interrupted as exc:
            reason = str(exc)
            if attempt < DOWNLOAD_ATTEMPTS:
                print(f"download interrupted ({reason}); resuming", file=sys.stderr)
            continue
        part.replace(dest)
        return dest
    raise DownloadError(
        f"download of {url} interrupted {DOWNLOAD_ATTEMPTS} times (last: {reason}); "
        f"rerun the command to resume from {part}"
    )


def _open(url: str, offset: int) -> http.client.HTTPResponse:
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == HTTP_RANGE_NOT_SATISFIABLE and offset:
            raise  # handled by the caller: the partial file does not match this server's file
        raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # refused, DNS, timeout, TLS
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"cannot download {url}: {reason}") from exc


def _transfer(url: str, part: Path, progress: bool) -> None:
    """One request: the rest of ``part`` (or all of it), appended. Raises _Interrupted if cut short."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset)
    except urllib.error.HTTPError:  # 416 for a non-empty part: it is stale (or longer than the file)
        part.unlink()
        raise _Interrupted("the partial file did not match the server's; starting over") from None
    with response:
        start = 0
        if offset and response.status == HTTP_PARTIAL_CONTENT:
            match = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if match and int(match.group(1)) == offset:
                start = offset
        # anything but the requested range (a server without Range support answers 200): start over
        length_header = response.headers.get("Content-Length")
        total = start + int(length_header) if length_header and length_header.isdigit() else None
        received = start
        with (
            open(part, "ab" if start else "wb") as f,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(PART_SUFFIX),
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            try:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (http.client.HTTPException, OSError) as exc:  # reset, timeout, IncompleteRead
                raise _Interrupted(f"{type(exc).__name__} after {received} bytes") from exc
    if total is not None and received < total:
        raise _Interrupted(f"connection closed after {received} of {total} bytes")
