"""Python client of the DINO feature service (``dino serve``), synchronous and asyncio, on httpx.

    from dino.client import DinoClient, DinoAPIError

    with DinoClient("http://127.0.0.1:8000", api_key="...") as dino:
        result = dino.embed(["cat.jpg", "dog.jpg"])          # result.embeddings: float32 [2, D]
        ids = dino.add(["cat.jpg", "dog.jpg"], labels=["cat", "dog"], metadata={"source": "garden"})
        for hit in dino.neighbors("query.jpg", k=5):
            print(hit.id, hit.score, hit.label, hit.metadata)
        overlay_png = dino.attention("cat.jpg", threshold=0.6)
        grid = dino.attention_of(ids[0], format="json").attention   # float32 [rows, columns]
        try:
            dino.delete("0" * 32)
        except DinoAPIError as error:
            print(error.status, error.detail)                # 404 no gallery image with id ...

:class:`AsyncDinoClient` has the same methods as coroutines (``async with AsyncDinoClient(...)``,
``await dino.embed(...)``, ``async for item in dino.iter_items()``).

Images are given as a path (``str`` or ``os.PathLike``: the file's bytes are sent as they are), as
``bytes`` (an encoded image file), as a Pillow image or as a NumPy array (``H x W x 3`` RGB,
``H x W x 4`` RGBA or ``H x W`` grey, ``uint8``). Pillow images and arrays are sent as lossless PNG
after the conversions the server itself makes for files (EXIF orientation, alpha over white, see
:mod:`dino.images`), so they give the embedding of the same pixels. Routes that take several images
(:meth:`DinoClient.embed`, :meth:`DinoClient.add`) accept one image or a list or tuple of them.

Errors: every HTTP error answer (4xx, 5xx), once retries are spent, raises :class:`DinoAPIError`
with the status and the server's ``detail``. Transport failures (connection refused, reset,
timeout) raise httpx's exceptions (:class:`httpx.TransportError`) once retries are spent.

Retries (:class:`RetryPolicy`): a 503 or 429 answer means the server refused the request before
acting on it (inference or decode queue full, model not ready, gallery backend unreachable), so
every request is sent again after the answer's ``Retry-After`` seconds (or an exponential backoff
without one), within a bounded number of attempts and a bounded total wait. Transport errors are
retried as follows:

- the connection could not be opened (``httpx.ConnectError``, ``httpx.ConnectTimeout``): nothing
  was sent, so every request is retried;
- the connection failed after the request may have reached the server (reset, closed without an
  answer): only requests that may be repeated are retried, i.e. all but ``POST /index``, which
  would add the images twice. ``POST /embed``, ``/attention`` and ``/neighbors`` change nothing on
  the server; ``DELETE`` is idempotent (a retried delete that finds the image gone counts as done);
- a read or write timeout, or waiting too long for a pooled connection: never retried (the timeout
  is the caller's budget for the call).

``ready()`` and ``health()`` are probes and never retry.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeAlias, overload
from urllib.parse import quote

import httpx
import numpy as np
from PIL import Image

from dino.images import apply_exif_orientation, to_rgb

__all__ = [
    "AsyncDinoClient",
    "AttentionResult",
    "DinoAPIError",
    "DinoClient",
    "EmbedResult",
    "GalleryItem",
    "GalleryStatus",
    "ImageInput",
    "IndexInfo",
    "ItemsPage",
    "Neighbor",
    "Readiness",
    "RetryPolicy",
]

#: one image: a file path, encoded image bytes, a Pillow image or a uint8 array (H x W [x 3|4])
ImageInput: TypeAlias = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray
#: one image, or a list/tuple of images (routes that take several)
ImagesInput: TypeAlias = ImageInput | Sequence[ImageInput]
Head: TypeAlias = int | Literal["mean"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
#: seconds one HTTP call may take (connect, each read and write): embedding a large batch on CPU is slow
DEFAULT_TIMEOUT = 60.0
#: seconds an idle pooled connection is reused: below the server's default keep-alive (5 s), so that a
#: request is not sent on a connection the server is closing at that moment
KEEPALIVE_EXPIRY = 2.0
#: characters of a non-JSON error body kept in DinoAPIError.detail
ERROR_BODY_CHARS = 1000
#: statuses that mean "refused before acting: try again later"
RETRY_STATUSES = frozenset({429, 503})
#: Pillow modes sent as they are (the server converts them exactly like dino.images.to_rgb)
PNG_AS_IS_MODES = frozenset({"RGB", "L"})
#: seconds between two /readyz polls of wait_ready()
READY_POLL_INTERVAL = 0.25


# --------------------------------------------------------------------------------------------------
# results and errors
# --------------------------------------------------------------------------------------------------


class DinoAPIError(Exception):
    """An HTTP error answer of the service (4xx or 5xx), raised once retries are spent.

    Attributes:
        status: the HTTP status code.
        detail: the server's JSON ``detail``: usually a message string; a list of validation errors
            for malformed parameters on servers that answer FastAPI's default format; the body's text
            when the answer is not JSON (a proxy's error page).
        retry_after: the answer's ``Retry-After`` in seconds, when it has one.
        method, url: the request that failed.
    """

    def __init__(
        self, status: int, detail: Any, *, method: str = "", url: str = "", retry_after: float | None = None
    ) -> None:
        self.status = status
        self.detail = detail
        self.method = method
        self.url = url
        self.retry_after = retry_after
        where = f" ({method} {url})" if method else ""
        super().__init__(f"HTTP {status}{where}: {self.message}")

    @property
    def message(self) -> str:
        """``detail`` as one line of text (validation errors joined as ``location: message``)."""
        return detail_text(self.detail)

    @classmethod
    def from_response(cls, response: httpx.Response) -> DinoAPIError:
        """The error of an HTTP answer (its JSON ``detail``, or its text)."""
        detail: Any
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "detail" in body:
            detail = body["detail"]
        else:
            detail = response.text[:ERROR_BODY_CHARS] or response.reason_phrase
        request = response.request
        return cls(
            response.status_code,
            detail,
            method=request.method,
            url=str(request.url),
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )


def detail_text(detail: Any) -> str:
    """A server ``detail`` as text: a string as it is, FastAPI validation errors as
    ``query.k: Input should be greater than or equal to 1; ...``, anything else as JSON."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list) and all(isinstance(item, dict) and "msg" in item for item in detail):
        parts = []
        for item in detail:
            location = ".".join(str(part) for part in item.get("loc", ()))
            parts.append(f"{location}: {item['msg']}" if location else str(item["msg"]))
        return "; ".join(parts)
    return json.dumps(detail, ensure_ascii=False, default=str)


@dataclass(frozen=True)
class EmbedResult:
    """Answer of :meth:`DinoClient.embed`.

    Attributes:
        model: name of the served model.
        dim: embedding dimension D.
        embeddings: float32 ``[n, D]``, one row per image in request order (L2-normalised unless
            ``normalize=False``).
        patch_tokens: with ``patch_tokens=True``: float32 ``[n, N, D]`` (N patches per image, never
            normalised); None otherwise.
    """

    model: str
    dim: int
    embeddings: np.ndarray
    patch_tokens: np.ndarray | None = None


@dataclass(frozen=True)
class AttentionResult:
    """Answer of :meth:`DinoClient.attention` with ``format="json"``.

    Attributes:
        model: name of the served model.
        grid: ``(rows, columns)`` of the patch grid.
        heads: number of attention heads of the model.
        head: the head shown, or ``"mean"`` (the average over heads).
        attention: float32 ``[rows, columns]`` [CLS] attention weights.
        mask: with a ``threshold``: bool ``[rows, columns]``, the patches holding that fraction of
            the attention mass; None otherwise.
    """

    model: str
    grid: tuple[int, int]
    heads: int
    head: int | str
    attention: np.ndarray
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class Neighbor:
    """One gallery image found by :meth:`DinoClient.neighbors` (best first).

    Attributes:
        id: the gallery image id (32 hex digits).
        score: cosine similarity with the query (higher is closer).
        label: the image's label, or None.
        metadata: the image's JSON metadata, or None.
    """

    id: str
    score: float
    label: str | None
    metadata: dict[str, Any] | None


@dataclass(frozen=True)
class GalleryItem:
    """One gallery entry (:meth:`DinoClient.items`): id, label and metadata."""

    id: str
    label: str | None
    metadata: dict[str, Any] | None


@dataclass(frozen=True)
class ItemsPage:
    """One page of the gallery listing: ``total`` images in the gallery, ``items`` from ``offset``."""

    total: int
    offset: int
    items: list[GalleryItem]


@dataclass(frozen=True)
class IndexInfo:
    """Answer of :meth:`DinoClient.info` (``GET /index``): the gallery's size and configuration."""

    size: int
    dim: int
    model: str
    model_sha256: str
    backend: str
    index_type: str
    persistent: bool
    read_only: bool
    collection: str | None = None


@dataclass(frozen=True)
class GalleryStatus:
    """The gallery part of :class:`Readiness`."""

    backend: str
    available: bool
    detail: str | None = None


@dataclass(frozen=True)
class Readiness:
    """Answer of :meth:`DinoClient.ready` (``GET /readyz``).

    ``status`` is ``"ready"``, or ``"degraded"`` when the model serves but the gallery's backend
    cannot be reached (``missing`` says why)."""

    status: str
    model: str
    provider: str
    gallery: GalleryStatus
    missing: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long a client retries (see the module docstring for *what* is retried).

    Attributes:
        max_attempts: tries of one call in all, the first included (1 disables retries).
        max_wait: seconds slept between the attempts of one call, at most in total. A ``Retry-After``
            that would go past it is not waited for: the error is raised at once.
        backoff: first delay (seconds) when there is no ``Retry-After`` (transport errors, answers
            without the header); doubled at each retry, up to ``max_backoff``.
    """

    max_attempts: int = 4
    max_wait: float = 30.0
    backoff: float = 0.25
    max_backoff: float = 4.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_wait < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("max_wait, backoff and max_backoff must not be negative")


NO_RETRY = RetryPolicy(max_attempts=1)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds of a ``Retry-After`` header (delta-seconds or an HTTP date); None when absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


# --------------------------------------------------------------------------------------------------
# requests: what to send, and whether it may be sent again
# --------------------------------------------------------------------------------------------------


@dataclass
class _Call:
    """One API call, before it is sent (the same for the sync and the async client)."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    data: dict[str, str] | None = None
    #: may be sent again after the server may have received it (False: POST /index)
    replayable: bool = True
    #: retry 429/503 answers and connection failures at all (False for the probes)
    retry: bool = True
    #: a 404 after a retried attempt means that attempt did it (DELETE)
    gone_is_done: bool = False


class _Attempts:
    """The retry decisions of one call: each answer or transport error gives the seconds to wait
    before the next attempt, or None to stop (return the answer or raise the error)."""

    def __init__(self, policy: RetryPolicy, call: _Call) -> None:
        self.policy = policy if call.retry else NO_RETRY
        self.call = call
        self.attempts = 0
        self.waited = 0.0
        #: an earlier attempt may have reached the server (its answer was lost)
        self.maybe_acted = False

    def _delay(self, retry_after: float | None) -> float | None:
        if self.attempts >= self.policy.max_attempts:
            return None
        if retry_after is None:
            retry_after = min(self.policy.max_backoff, self.policy.backoff * 2 ** (self.attempts - 1))
        if self.waited + retry_after > self.policy.max_wait:
            return None
        self.waited += retry_after
        return retry_after

    def after_response(self, response: httpx.Response) -> float | None:
        self.attempts += 1
        if response.status_code not in RETRY_STATUSES:
            return None
        return self._delay(parse_retry_after(response.headers.get("retry-after")))

    def after_error(self, error: httpx.TransportError) -> float | None:
        self.attempts += 1
        if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout)):
            pass  # the connection was never opened: nothing was sent
        elif isinstance(error, httpx.TimeoutException):
            return None  # read/write/pool timeout: the caller's time budget is spent
        elif isinstance(error, (httpx.NetworkError, httpx.RemoteProtocolError)) and self.call.replayable:
            delay = self._delay(None)
            if delay is not None:
                self.maybe_acted = True
            return delay
        else:
            return None
        return self._delay(None)

    def result(self, response: httpx.Response) -> httpx.Response:
        """The final answer, or DinoAPIError for an error status."""
        if response.status_code < 400:
            return response
        if response.status_code == 404 and self.call.gone_is_done and self.maybe_acted:
            return response
        raise DinoAPIError.from_response(response)


def _image_id(image_id: str) -> str:
    if not isinstance(image_id, str):
        raise TypeError(f"an image id is a string, got {type(image_id).__name__}")
    return quote(image_id, safe="")


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _pil_to_png(img: Image.Image) -> bytes:
    """A Pillow image as PNG, converted as the server converts a file: EXIF orientation applied,
    alpha composited over white, 16-bit/float grey scaled (:func:`dino.images.to_rgb`)."""
    img = apply_exif_orientation(img)
    return _png(img if img.mode in PNG_AS_IS_MODES else to_rgb(img))


def _array_to_png(array: np.ndarray) -> bytes:
    if array.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 (0..255), got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"an image array must be H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA), got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"an image array must not be empty, got {array.shape}")
    return _pil_to_png(Image.fromarray(np.ascontiguousarray(array)))  # L, RGB or RGBA


def encode_image(image: ImageInput, index: int = 0) -> tuple[str, bytes, str]:
    """``(file name, bytes, content type)`` of one image as it is uploaded (see the module docstring)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.name or f"image{index}", path.read_bytes(), "application/octet-stream"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image{index}", bytes(image), "application/octet-stream"
    if isinstance(image, Image.Image):
        return f"image{index}.png", _pil_to_png(image), "image/png"
    if isinstance(image, np.ndarray):
        return f"image{index}.png", _array_to_png(image), "image/png"
    raise TypeError(
        f"an image is a path, bytes, a PIL image or a numpy array, got {type(image).__name__}"
        " (several images go in a list)"
    )


def _image_list(images: ImagesInput) -> list[ImageInput]:
    listed: list[ImageInput] = list(images) if isinstance(images, (list, tuple)) else [images]  # type: ignore[list-item]
    if not listed:
        raise ValueError("no image given")
    return listed


def _multipart(images: Sequence[ImageInput]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", encode_image(image, i)) for i, image in enumerate(images)]


def _embed_call(images: ImagesInput, normalize: bool, patch_tokens: bool) -> _Call:
    params = {"normalize": _flag(normalize), "patch_tokens": _flag(patch_tokens)}
    return _Call("POST", "/embed", params=params, files=_multipart(_image_list(images)))


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _attention_params(head: Head, threshold: float | None, format: str) -> dict[str, Any]:
    if format not in ("png", "json"):
        raise ValueError(f"format must be 'png' or 'json', got {format!r}")
    params: dict[str, Any] = {"head": str(head), "format": format}
    if threshold is not None:
        params["threshold"] = threshold
    return params


def _attention_call(image: ImageInput, head: Head, threshold: float | None, format: str) -> _Call:
    params = _attention_params(head, threshold, format)
    return _Call("POST", "/attention", params=params, files=_multipart([image]))


def _attention_of_call(image_id: str, head: Head, threshold: float | None, format: str) -> _Call:
    return _Call("GET", f"/attention/{_image_id(image_id)}", params=_attention_params(head, threshold, format))


def _neighbors_call(image: ImageInput, k: int) -> _Call:
    return _Call("POST", "/neighbors", params={"k": k}, files=_multipart([image]))


def _per_image(values: Any, count: int, what: str) -> list[Any]:
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{what}: got {len(values)} values for {count} images (give one for all, or one per image)")
    return values


def _add_call(
    images: ImagesInput,
    labels: str | Sequence[str | None] | None,
    metadata: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None,
) -> _Call:
    listed = _image_list(images)
    count = len(listed)
    data: dict[str, str] = {}
    # always one JSON list, one entry per image: a lone label such as "[draft]" is not mistaken for one
    if labels is not None:
        label_list = [labels] * count if isinstance(labels, str) else _per_image(labels, count, "labels")
        for i, label in enumerate(label_list):
            if label is not None and not isinstance(label, str):
                raise TypeError(f"labels[{i}] must be a string or None, got {type(label).__name__}")
        data["labels"] = json.dumps(label_list)
    if metadata is not None:
        entries = [metadata] * count if isinstance(metadata, Mapping) else _per_image(metadata, count, "metadata")
        for i, entry in enumerate(entries):
            if entry is not None and not isinstance(entry, Mapping):
                raise TypeError(f"metadata[{i}] must be a mapping (JSON object) or None, got {type(entry).__name__}")
        data["metadata"] = json.dumps([None if e is None else dict(e) for e in entries], allow_nan=False)
    return _Call("POST", "/index", files=_multipart(listed), data=data or None, replayable=False)


def _items_call(offset: int, limit: int) -> _Call:
    return _Call("GET", "/index/items", params={"offset": offset, "limit": limit})


# --------------------------------------------------------------------------------------------------
# answers
# --------------------------------------------------------------------------------------------------


def _parse_embed(body: dict[str, Any]) -> EmbedResult:
    embeddings = np.asarray(body["embeddings"], dtype=np.float32)
    tokens = body.get("patch_tokens")
    return EmbedResult(
        model=body["model"],
        dim=int(body["dim"]),
        embeddings=embeddings.reshape(len(body["embeddings"]), int(body["dim"])),
        patch_tokens=None if tokens is None else np.asarray(tokens, dtype=np.float32),
    )


def _parse_attention(body: dict[str, Any]) -> AttentionResult:
    rows, columns = (int(v) for v in body["grid"])
    mask = body.get("mask")
    return AttentionResult(
        model=body["model"],
        grid=(rows, columns),
        heads=int(body["heads"]),
        head=body["head"],
        attention=np.asarray(body["attention"], dtype=np.float32).reshape(rows, columns),
        mask=None if mask is None else np.asarray(mask, dtype=bool).reshape(rows, columns),
    )


def _attention_answer(response: httpx.Response, format: str) -> bytes | AttentionResult:
    return _parse_attention(response.json()) if format == "json" else response.content


def _parse_neighbors(body: dict[str, Any]) -> list[Neighbor]:
    return [
        Neighbor(id=n["id"], score=float(n["score"]), label=n.get("label"), metadata=n.get("metadata"))
        for n in body["neighbors"]
    ]


def _parse_items(body: dict[str, Any]) -> ItemsPage:
    items = [GalleryItem(id=i["id"], label=i.get("label"), metadata=i.get("metadata")) for i in body["items"]]
    return ItemsPage(total=int(body["total"]), offset=int(body["offset"]), items=items)


def _parse_info(body: dict[str, Any]) -> IndexInfo:
    return IndexInfo(
        size=int(body["size"]),
        dim=int(body["dim"]),
        model=body["model"],
        model_sha256=body["model_sha256"],
        backend=body["backend"],
        index_type=body["index_type"],
        persistent=bool(body["persistent"]),
        read_only=bool(body["read_only"]),
        collection=body.get("collection"),
    )


def _parse_ready(body: dict[str, Any]) -> Readiness:
    gallery = body.get("gallery") or {}
    return Readiness(
        status=body["status"],
        model=body["model"],
        provider=body["provider"],
        gallery=GalleryStatus(
            backend=gallery.get("backend", ""), available=bool(gallery.get("available")), detail=gallery.get("detail")
        ),
        missing=list(body.get("missing") or []),
    )


def _http_options(base_url: str, api_key: str | None, timeout: float | httpx.Timeout | None) -> dict[str, Any]:
    headers = {"User-Agent": "dino-client", "Accept": "application/json, image/*"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return {
        "base_url": base_url,
        "headers": headers,
        "timeout": timeout,
        "limits": httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY),
    }


# --------------------------------------------------------------------------------------------------
# the clients
# --------------------------------------------------------------------------------------------------


class DinoClient:
    """Synchronous client of the DINO feature service; one pooled httpx connection set per client.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000`` (a path prefix behind a proxy is kept).
        api_key: the server's ``DINO_API_KEY``, sent as ``Authorization: Bearer``; None for none.
        timeout: seconds for connecting and for each read/write of one HTTP call (an
            :class:`httpx.Timeout` for finer control; None waits forever).
        retry: the retry policy (:class:`RetryPolicy`; ``RetryPolicy(max_attempts=1)`` disables retries).
        transport: an httpx transport to use instead of the network (tests, custom TLS, proxies).

    Use it as a context manager, or call :meth:`close`. Thread-safe: httpx clients may be shared.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(transport=transport, **_http_options(base_url, api_key, timeout))

    @property
    def base_url(self) -> str:
        """The server's URL."""
        return str(self._http.base_url)

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    def __enter__(self) -> DinoClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, call: _Call) -> httpx.Response:
        attempts = _Attempts(self.retry, call)
        while True:
            try:
                response = self._http.request(
                    call.method, call.path, params=call.params, files=call.files, data=call.data
                )
            except httpx.TransportError as error:
                delay = attempts.after_error(error)
                if delay is None:
                    raise
            else:
                delay = attempts.after_response(response)
                if delay is None:
                    return attempts.result(response)
            time.sleep(delay)

    # ---------------------------------------------------------------- features

    def embed(self, images: ImagesInput, normalize: bool = True, patch_tokens: bool = False) -> EmbedResult:
        """[CLS] embeddings of one image or a list of images (``POST /embed``), in order.

        Args:
            images: one image or a list/tuple of images (path, bytes, PIL image or uint8 array).
            normalize: L2-normalise the embeddings (the server's default).
            patch_tokens: also return the patch tokens ``[n, N, D]`` (large: N x D floats per image).
        """
        return _parse_embed(self._send(_embed_call(images, normalize, patch_tokens)).json())

    @overload
    def attention(
        self, image: ImageInput, *, head: Head = ..., threshold: float | None = ..., format: Literal["png"] = ...
    ) -> bytes: ...
    @overload
    def attention(
        self, image: ImageInput, *, head: Head = ..., threshold: float | None = ..., format: Literal["json"]
    ) -> AttentionResult: ...
    @overload
    def attention(
        self, image: ImageInput, *, head: Head = ..., threshold: float | None = ..., format: str
    ) -> bytes | AttentionResult: ...
    def attention(
        self, image: ImageInput, *, head: Head = "mean", threshold: float | None = None, format: str = "png"
    ) -> bytes | AttentionResult:
        """DINO [CLS] attention map of one image (``POST /attention``).

        Args:
            image: the image (path, bytes, PIL image or uint8 array).
            head: an attention head index, or ``"mean"`` for the average over heads.
            threshold: keep the patches holding this fraction (0..1] of the attention mass (a mask).
            format: ``"png"``: the PNG bytes of a heatmap over the model's input crop;
                ``"json"``: an :class:`AttentionResult` with the grid of weights as arrays.
        """
        return _attention_answer(self._send(_attention_call(image, head, threshold, format)), format)

    @overload
    def attention_of(
        self, image_id: str, *, head: Head = ..., threshold: float | None = ..., format: Literal["png"] = ...
    ) -> bytes: ...
    @overload
    def attention_of(
        self, image_id: str, *, head: Head = ..., threshold: float | None = ..., format: Literal["json"]
    ) -> AttentionResult: ...
    @overload
    def attention_of(
        self, image_id: str, *, head: Head = ..., threshold: float | None = ..., format: str
    ) -> bytes | AttentionResult: ...
    def attention_of(
        self, image_id: str, *, head: Head = "mean", threshold: float | None = None, format: str = "png"
    ) -> bytes | AttentionResult:
        """Attention map of a gallery image (``GET /attention/{id}``); arguments as :meth:`attention`."""
        return _attention_answer(self._send(_attention_of_call(image_id, head, threshold, format)), format)

    # ---------------------------------------------------------------- gallery

    def neighbors(self, image: ImageInput, k: int = 10) -> list[Neighbor]:
        """The ``k`` gallery images nearest to one image, best first (``POST /neighbors``)."""
        return _parse_neighbors(self._send(_neighbors_call(image, k)).json())

    def neighbors_of(self, image_id: str, k: int = 10) -> list[Neighbor]:
        """The ``k`` gallery images nearest to a gallery image, itself excluded (``GET /neighbors/{id}``)."""
        return _parse_neighbors(self._send(_Call("GET", f"/neighbors/{_image_id(image_id)}", params={"k": k})).json())

    def add(
        self,
        images: ImagesInput,
        labels: str | Sequence[str | None] | None = None,
        metadata: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[str]:
        """Add images to the gallery (``POST /index``); returns their new ids, in order.

        Answered once the images are stored durably. Never resent after the request may have reached
        the server (a lost answer raises the transport error: the images may or may not be stored).

        Args:
            images: one image or a list/tuple of images.
            labels: one label for every image, or one label (or None) per image.
            metadata: one JSON object for every image, or one (or None) per image.
        """
        return list(self._send(_add_call(images, labels, metadata)).json()["ids"])

    def delete(self, image_id: str) -> None:
        """Remove an image from the gallery (``DELETE /index/{id}``); DinoAPIError 404 when there is none."""
        self._send(_Call("DELETE", f"/index/{_image_id(image_id)}", gone_is_done=True))

    def items(self, offset: int = 0, limit: int = 100) -> ItemsPage:
        """One page of the gallery's entries, in the order they were added (``GET /index/items``)."""
        return _parse_items(self._send(_items_call(offset, limit)).json())

    def iter_items(self, page_size: int = 100) -> Iterator[GalleryItem]:
        """Every gallery entry, a page at a time. Images added or deleted meanwhile may be missed or
        seen twice (the pages are read by offset)."""
        offset = 0
        while True:
            page = self.items(offset, page_size)
            yield from page.items
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return

    def image(self, image_id: str) -> bytes:
        """The stored gallery image (the model's centre crop), JPEG bytes (``GET /index/{id}/image``)."""
        return self._send(_Call("GET", f"/index/{_image_id(image_id)}/image")).content

    def info(self) -> IndexInfo:
        """The gallery's size, dimension, model, backend and index type (``GET /index``)."""
        return _parse_info(self._send(_Call("GET", "/index")).json())

    # ---------------------------------------------------------------- operations

    def health(self) -> bool:
        """True when the server process answers ``GET /healthz`` (no retries; False when unreachable)."""
        try:
            return self._send(_Call("GET", "/healthz", retry=False)).status_code == 200
        except (httpx.TransportError, DinoAPIError):
            return False

    def ready(self) -> Readiness:
        """``GET /readyz`` (no retries): the model is loaded and warm. DinoAPIError 503 while it is not."""
        return _parse_ready(self._send(_Call("GET", "/readyz", retry=False)).json())

    def wait_ready(self, timeout: float = 60.0) -> Readiness:
        """Poll :meth:`ready` until the server is ready; the last error (or TimeoutError) after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.ready()
            except (httpx.TransportError, DinoAPIError) as error:
                if isinstance(error, DinoAPIError) and error.status != 503:
                    raise
                if time.monotonic() + READY_POLL_INTERVAL > deadline:
                    raise TimeoutError(f"{self.base_url} not ready after {timeout:g} s: {error}") from error
            time.sleep(READY_POLL_INTERVAL)


class AsyncDinoClient:
    """Asyncio client of the DINO feature service: the methods of :class:`DinoClient`, as coroutines.

    Arguments as :class:`DinoClient` (``transport`` an :class:`httpx.AsyncBaseTransport`). Images are
    read and encoded in a worker thread, off the event loop. Use ``async with``, or ``await aclose()``.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(transport=transport, **_http_options(base_url, api_key, timeout))

    @property
    def base_url(self) -> str:
        """The server's URL."""
        return str(self._http.base_url)

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncDinoClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        attempts = _Attempts(self.retry, call)
        while True:
            try:
                response = await self._http.request(
                    call.method, call.path, params=call.params, files=call.files, data=call.data
                )
            except httpx.TransportError as error:
                delay = attempts.after_error(error)
                if delay is None:
                    raise
            else:
                delay = attempts.after_response(response)
                if delay is None:
                    return attempts.result(response)
            await asyncio.sleep(delay)

    # ---------------------------------------------------------------- features

    async def embed(self, images: ImagesInput, normalize: bool = True, patch_tokens: bool = False) -> EmbedResult:
        """[CLS] embeddings of one image or a list of images; see :meth:`DinoClient.embed`."""
        call = await asyncio.to_thread(_embed_call, images, normalize, patch_tokens)
        return _parse_embed((await self._send(call)).json())

    @overload
    async def attention(
        self, image: ImageInput, *, head: Head = ..., threshold: float | None = ..., format: Literal["png"] = ...
    ) -> bytes: ...
    @overload
    async def attention(
        self, image: ImageInput, *, head: Head = ..., threshold: float | None = ..., format: Literal["json"]
    ) -> AttentionResult: ...
    @overload
    async def attention(
        self, image: ImageInput, *, head: Head = ..., threshold: float | None = ..., format: str
    ) -> bytes | AttentionResult: ...
    async def attention(
        self, image: ImageInput, *, head: Head = "mean", threshold: float | None = None, format: str = "png"
    ) -> bytes | AttentionResult:
        """Attention map of one image: PNG bytes or :class:`AttentionResult`; see :meth:`DinoClient.attention`."""
        call = await asyncio.to_thread(_attention_call, image, head, threshold, format)
        return _attention_answer(await self._send(call), format)

    @overload
    async def attention_of(
        self, image_id: str, *, head: Head = ..., threshold: float | None = ..., format: Literal["png"] = ...
    ) -> bytes: ...
    @overload
    async def attention_of(
        self, image_id: str, *, head: Head = ..., threshold: float | None = ..., format: Literal["json"]
    ) -> AttentionResult: ...
    @overload
    async def attention_of(
        self, image_id: str, *, head: Head = ..., threshold: float | None = ..., format: str
    ) -> bytes | AttentionResult: ...
    async def attention_of(
        self, image_id: str, *, head: Head = "mean", threshold: float | None = None, format: str = "png"
    ) -> bytes | AttentionResult:
        """Attention map of a gallery image; see :meth:`DinoClient.attention_of`."""
        return _attention_answer(await self._send(_attention_of_call(image_id, head, threshold, format)), format)

    # ---------------------------------------------------------------- gallery

    async def neighbors(self, image: ImageInput, k: int = 10) -> list[Neighbor]:
        """The ``k`` gallery images nearest to one image; see :meth:`DinoClient.neighbors`."""
        call = await asyncio.to_thread(_neighbors_call, image, k)
        return _parse_neighbors((await self._send(call)).json())

    async def neighbors_of(self, image_id: str, k: int = 10) -> list[Neighbor]:
        """The ``k`` gallery images nearest to a gallery image; see :meth:`DinoClient.neighbors_of`."""
        call = _Call("GET", f"/neighbors/{_image_id(image_id)}", params={"k": k})
        return _parse_neighbors((await self._send(call)).json())

    async def add(
        self,
        images: ImagesInput,
        labels: str | Sequence[str | None] | None = None,
        metadata: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[str]:
        """Add images to the gallery, returns their ids; see :meth:`DinoClient.add` (never resent)."""
        call = await asyncio.to_thread(_add_call, images, labels, metadata)
        return list((await self._send(call)).json()["ids"])

    async def delete(self, image_id: str) -> None:
        """Remove an image from the gallery; see :meth:`DinoClient.delete`."""
        await self._send(_Call("DELETE", f"/index/{_image_id(image_id)}", gone_is_done=True))

    async def items(self, offset: int = 0, limit: int = 100) -> ItemsPage:
        """One page of the gallery's entries; see :meth:`DinoClient.items`."""
        return _parse_items((await self._send(_items_call(offset, limit))).json())

    async def iter_items(self, page_size: int = 100) -> AsyncIterator[GalleryItem]:
        """Every gallery entry, a page at a time (``async for``); see :meth:`DinoClient.iter_items`."""
        offset = 0
        while True:
            page = await self.items(offset, page_size)
            for item in page.items:
                yield item
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return

    async def image(self, image_id: str) -> bytes:
        """The stored gallery image, JPEG bytes; see :meth:`DinoClient.image`."""
        return (await self._send(_Call("GET", f"/index/{_image_id(image_id)}/image"))).content

    async def info(self) -> IndexInfo:
        """The gallery's size and configuration; see :meth:`DinoClient.info`."""
        return _parse_info((await self._send(_Call("GET", "/index"))).json())

    # ---------------------------------------------------------------- operations

    async def health(self) -> bool:
        """True when the server process answers ``GET /healthz``; see :meth:`DinoClient.health`."""
        try:
            return (await self._send(_Call("GET", "/healthz", retry=False))).status_code == 200
        except (httpx.TransportError, DinoAPIError):
            return False

    async def ready(self) -> Readiness:
        """``GET /readyz`` (no retries); see :meth:`DinoClient.ready`."""
        return _parse_ready((await self._send(_Call("GET", "/readyz", retry=False))).json())

    async def wait_ready(self, timeout: float = 60.0) -> Readiness:
        """Poll :meth:`ready` until the server is ready; see :meth:`DinoClient.wait_ready`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self.ready()
            except (httpx.TransportError, DinoAPIError) as error:
                if isinstance(error, DinoAPIError) and error.status != 503:
                    raise
                if time.monotonic() + READY_POLL_INTERVAL > deadline:
                    raise TimeoutError(f"{self.base_url} not ready after {timeout:g} s: {error}") from error
            await asyncio.sleep(READY_POLL_INTERVAL)
