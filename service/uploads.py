"""Reading images (and gallery fields) out of request bodies, within the configured limits.

Two body formats are accepted by every image route:

- ``multipart/form-data`` with one or more files in the field ``images`` (single-image routes also
  accept the field name ``image``);
- ``application/json``: ``{"images": ["<base64>", ...]}`` (a ``data:image/...;base64,`` prefix is
  allowed), plus ``labels``/``metadata`` for ``POST /index``.

``POST /v1/embeddings`` takes OpenAI's embeddings request instead (:func:`read_openai_embedding_request`).

The body size is capped by :class:`BodySizeLimitMiddleware` while it is received: a declared
``Content-Length`` above the limit is refused before reading anything, and a body that streams past
the limit (chunked upload, lying header) is cut off as soon as it does, without buffering the rest.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.schemas import error_body

MULTIPART = "multipart/form-data"
JSON_TYPES = ("application/json",)
IMAGES_FIELD = "images"
SINGLE_IMAGE_FIELDS = ("images", "image")
#: the multipart field of the clip of POST /attention/video
VIDEO_FIELD = "video"
#: methods whose bodies the size limit applies to
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyTooLarge(HTTPException):
    """The request body exceeds ``max_upload_bytes`` (HTTP 413). An HTTPException so that it passes
    unchanged through FastAPI/Starlette body parsing when raised from inside ``receive``."""

    def __init__(self, limit: int):
        super().__init__(status_code=413, detail=f"request body too large: the limit is {limit} bytes")


class BodyTimeout(HTTPException):
    """The client stopped sending the request body (HTTP 408). An HTTPException for the same reason
    as :class:`BodyTooLarge`."""

    def __init__(self, seconds: float):
        super().__init__(
            status_code=408,
            detail=f"request body stalled: no data for {seconds:g} s",
            headers={"Connection": "close"},
        )


class BodySizeLimitMiddleware:
    """Pure ASGI middleware enforcing a maximum request body size while the body streams in, and a
    deadline between two chunks of the body (a client that stalls mid-upload gets 408)."""

    def __init__(self, app, max_bytes: int, body_timeout: float | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, scope, 400, "invalid Content-Length header")
                    return
        if declared is not None and declared > self.max_bytes:
            await _send_json(send, scope, 413, BodyTooLarge(self.max_bytes).detail)
            return
        received = 0
        body_complete = False

        async def limited_receive():
            nonlocal received, body_complete
            if body_complete or self.body_timeout is None:
                # after the body, receive() waits for the client to disconnect: no deadline there
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), self.body_timeout)
                except TimeoutError:
                    raise BodyTimeout(self.body_timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                body_complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


async def _send_json(send, scope, status: int, detail: str) -> None:
    body = json.dumps(error_body(scope.get("path", ""), status, detail)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class UploadError(HTTPException):
    """A malformed request body (HTTP 415 for a wrong content type, 422 otherwise, 413 for too many images)."""

    def __init__(self, detail: str, status_code: int = 422):
        super().__init__(status_code=status_code, detail=detail)


@dataclass
class Upload:
    """Images of a request (raw bytes, in request order) and its other fields.

    ``fields`` holds the other multipart fields (name -> list of string values); ``json_body`` the
    parsed JSON object of a JSON request.
    """

    images: list[bytes]
    names: list[str]
    fields: dict[str, list[str]] = field(default_factory=dict)
    json_body: dict[str, Any] | None = None

    def describe(self, i: int) -> str:
        """How error messages refer to image ``i``."""
        name = self.names[i]
        return f"image {i}" + (f" ({name})" if name else "")


#: deepest nesting of client JSON (metadata, labels) that is stored and sent back later
MAX_JSON_DEPTH = 32


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e400 parses to infinity, which JSON cannot carry back
        raise ValueError(f"the number {text} is out of range")
    return value


def strict_json_loads(text: str | bytes) -> Any:
    """json.loads that accepts only what can be sent back as JSON: no NaN/Infinity, no number that
    overflows to infinity. Nesting too deep for the parser is a ValueError, not a RecursionError."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def check_json_value(value: Any, where: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse (422) a parsed JSON value that could not be stored and answered later: nesting deeper
    than ``max_depth``, strings or keys that are not valid Unicode (lone surrogate escapes such as
    "\\ud800" cannot be encoded as UTF-8), and non-finite numbers. Iterative: no recursion limit."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                raise UploadError(f"{where} is nested deeper than {max_depth} levels")
            if isinstance(item, dict):
                for key in item:
                    _check_text(key, where)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, float) and not math.isfinite(item):
            raise UploadError(f"{where} holds a number that is not finite")


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UploadError(f"{where} holds text that is not valid Unicode (a lone surrogate escape)") from None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _check_uncompressed(request: Request) -> None:
    """415 for a compressed body: it would have to be inflated past max_upload_bytes to be checked."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UploadError(
            f"unsupported Content-Encoding {encoding!r}: send the body uncompressed (images are compressed already)",
            status_code=415,
        )


async def read_upload(request: Request, *, max_images: int, field_names: tuple[str, ...] = (IMAGES_FIELD,)) -> Upload:
    """Parse the images (and other fields) of a multipart or JSON request body."""
    _check_uncompressed(request)
    media_type = _media_type(request)
    if request.headers.get("content-length") == "0":
        raise UploadError(
            f"empty request body: send the images as multipart/form-data files in the field '{field_names[0]}' "
            'or as JSON {"images": ["<base64>", ...]}'
        )
    if media_type == MULTIPART:
        upload = await _read_multipart(request, max_images, field_names)
    elif media_type in JSON_TYPES or media_type.endswith("+json"):
        upload = await _read_json(request, max_images)
    elif not media_type and not await request.body():
        raise UploadError("empty request body: send the images as multipart/form-data or JSON")
    else:
        raise UploadError(
            f"unsupported content type {media_type or '(none)'!r}: send multipart/form-data with files in the field "
            f'\'{field_names[0]}\', or application/json {{"images": ["<base64>", ...]}}',
            status_code=415,
        )
    if not upload.images and upload.json_body is not None:
        raise UploadError("no image in the request: the JSON list 'images' is empty")
    if not upload.images:
        raise UploadError(
            f"no image in the request: expected files in the multipart field '{field_names[0]}'"
            + (f" (got fields {sorted(upload.fields)})" if upload.fields else "")
        )
    return upload


async def _read_multipart(request: Request, max_images: int, field_names: tuple[str, ...]) -> Upload:
    try:
        form = await request.form(max_files=max_images, max_fields=1000)
    except StarletteHTTPException as exc:
        # Starlette refuses more than max_files files with a 400; that is our "too many images"
        if exc.status_code == 400 and "Too many files" in str(exc.detail):
            raise UploadError(f"too many images: at most {max_images} per request", status_code=413) from exc
        raise
    try:
        images, names = [], []
        fields: dict[str, list[str]] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in field_names:
                    raise UploadError(f"field '{key}' must be text, not a file (images go in '{field_names[0]}')")
                images.append(await value.read())
                names.append(value.filename or "")
            else:
                if key in field_names:
                    raise UploadError(f"field '{key}' must hold image files, not text (use JSON for base64 images)")
                fields.setdefault(key, []).append(value)
        if len(images) > max_images:
            raise UploadError(f"too many images: {len(images)}, at most {max_images} per request", status_code=413)
        return Upload(images=images, names=names, fields=fields)
    finally:
        await form.close()


async def _read_json(request: Request, max_images: int) -> Upload:
    body = await request.body()
    if not body:
        raise UploadError('empty request body: expected JSON {"images": ["<base64>", ...]}')
    try:
        data = strict_json_loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UploadError(f"invalid JSON body: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get(IMAGES_FIELD), list):
        raise UploadError("JSON body must be an object with a list 'images' of base64-encoded images")
    encoded = data[IMAGES_FIELD]
    if len(encoded) > max_images:
        raise UploadError(f"too many images: {len(encoded)}, at most {max_images} per request", status_code=413)
    images = [decode_base64_image(item, f"images[{i}]") for i, item in enumerate(encoded)]
    return Upload(images=images, names=[""] * len(images), json_body=data)


def decode_base64_image(item: object, where: str) -> bytes:
    """The bytes of a base64 image string (a ``data:image/...;base64,`` URL is fine); 422 otherwise."""
    if not isinstance(item, str):
        raise UploadError(f"{where} must be a base64 string")
    if item.startswith("data:") and "," in item:  # data URL from a browser: data:image/png;base64,....
        item = item.split(",", 1)[1]
    try:
        return base64.b64decode("".join(item.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UploadError(f"{where} is not valid base64: {exc}") from exc


@dataclass(frozen=True)
class OpenAIEmbeddingInput:
    """A checked ``POST /v1/embeddings`` request: the images and the options."""

    images: list[bytes]
    model: str | None
    encoding_format: str
    dimensions: int | None


#: the request fields of OpenAI's embeddings API that this route understands
OPENAI_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user"})
OPENAI_ENCODINGS = ("float", "base64")


async def read_openai_embedding_request(request: Request, *, max_images: int) -> OpenAIEmbeddingInput:
    """Parse ``POST /v1/embeddings``: JSON ``{"input": <image> | [<image>, ...], "model": ...,
    "encoding_format": "float" | "base64", "dimensions": ..., "user": ...}``, each image a
    ``data:image/...;base64,`` URL or plain base64."""
    _check_uncompressed(request)
    media_type = _media_type(request)
    if media_type not in JSON_TYPES and not media_type.endswith("+json"):
        raise UploadError(
            f"unsupported content type {media_type or '(none)'!r}: send application/json "
            '{"input": ["data:image/jpeg;base64,..."], "model": "..."}',
            status_code=415,
        )
    body = await request.body()
    try:
        data = strict_json_loads(body) if body else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UploadError(f"invalid JSON body: {exc}") from exc
    if not isinstance(data, dict) or "input" not in data:
        raise UploadError('JSON body must be an object with "input": an image (base64 or data URL) or a list of them')
    unknown = sorted(set(data) - OPENAI_FIELDS)
    if unknown:
        raise UploadError(f"unknown field {unknown[0]!r}: this route takes {', '.join(sorted(OPENAI_FIELDS))}")
    raw = data["input"]
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise UploadError('"input" must be an image (base64 or data URL) or a non-empty list of them')
    if len(items) > max_images:
        raise UploadError(f"too many images: {len(items)}, at most {max_images} per request", status_code=413)
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise UploadError('"model" must be a string')
    encoding = data.get("encoding_format", "float")
    if encoding not in OPENAI_ENCODINGS:
        raise UploadError(f'"encoding_format" must be one of {", ".join(OPENAI_ENCODINGS)}')
    dimensions = data.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)):
        raise UploadError('"dimensions" must be an integer')
    if data.get("user") is not None and not isinstance(data["user"], str):
        raise UploadError('"user" must be a string')
    images = [decode_base64_image(item, f"input[{i}]") for i, item in enumerate(items)]
    return OpenAIEmbeddingInput(images=images, model=model, encoding_format=encoding, dimensions=dimensions)


async def read_video_upload(request: Request, max_bytes: int) -> bytes:
    """The clip of ``POST /attention/video``: one file in the multipart field ``video``, at most
    ``max_bytes`` (the body limit of every route applies first, while the body streams in)."""
    _check_uncompressed(request)
    media_type = _media_type(request)
    if media_type != MULTIPART:
        raise UploadError(
            f"unsupported content type {media_type or '(none)'!r}: send multipart/form-data with the clip in the "
            f"field '{VIDEO_FIELD}'",
            status_code=415,
        )
    try:
        form = await request.form(max_files=1, max_fields=16)
    except StarletteHTTPException as exc:
        # Starlette refuses more than max_files files with a 400: here, a request of several videos
        if exc.status_code == 400 and "Too many files" in str(exc.detail):
            raise UploadError(f"one video per request, in the field '{VIDEO_FIELD}'") from exc
        raise
    try:
        video = None
        for key, value in form.multi_items():
            if key != VIDEO_FIELD:
                raise UploadError(f"unknown field '{key}': this route takes one file in the field '{VIDEO_FIELD}'")
            if not isinstance(value, UploadFile):
                raise UploadError(f"field '{VIDEO_FIELD}' must be a file, not text")
            video = value
        if video is None:
            raise UploadError(f"no video in the request: expected a file in the multipart field '{VIDEO_FIELD}'")
        too_large = f"video too large: the limit is {max_bytes} bytes (DINO_MAX_VIDEO_BYTES)"
        if video.size is not None and video.size > max_bytes:
            raise UploadError(too_large, status_code=413)
        data = await video.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise UploadError(too_large, status_code=413)
        if not data:
            raise UploadError("the video is empty")
        return data
    finally:
        await form.close()


def single_image(upload: Upload) -> bytes:
    """The one image of a single-image route (422 otherwise)."""
    if len(upload.images) != 1:
        raise UploadError(f"this route takes exactly one image, got {len(upload.images)}")
    return upload.images[0]


# ------------------------------------------------------------------------------------------------
# Gallery fields of POST /index
# ------------------------------------------------------------------------------------------------


def _per_image(values: list, count: int, what: str) -> list:
    """One value for all images, or exactly one per image."""
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise UploadError(f"{what}: got {len(values)} values for {count} images (give one for all, or one per image)")
    return values


def parse_labels(upload: Upload, count: int, max_chars: int) -> list[str | None]:
    """Labels of ``POST /index``: repeated ``labels`` fields, one JSON list, or JSON ``"labels"``
    (a string for every image or a list aligned with the images). Missing -> None for every image."""
    if upload.json_body is not None:
        raw = upload.json_body.get("labels")
        if raw is None:
            return [None] * count
        values = [raw] if isinstance(raw, str) else raw
        if not isinstance(values, list):
            raise UploadError("labels must be a string or a list of strings")
    else:
        values = upload.fields.get("labels", [])
        if not values:
            return [None] * count
        if len(values) == 1 and values[0].lstrip().startswith("["):
            try:
                values = strict_json_loads(values[0])
            except ValueError as exc:
                raise UploadError(f"labels: invalid JSON list: {exc}") from exc
            if not isinstance(values, list):
                raise UploadError("labels must be a list of strings")
    labels = _per_image(list(values), count, "labels")
    for i, label in enumerate(labels):
        if label is not None and not isinstance(label, str):
            raise UploadError(f"labels[{i}] must be a string or null")
        if label is not None and len(label) > max_chars:
            raise UploadError(f"labels[{i}] is longer than {max_chars} characters")
        if label is not None:
            _check_text(label, f"labels[{i}]")
    return labels


def parse_metadata(upload: Upload, count: int, max_bytes: int) -> list[dict | None]:
    """Metadata of ``POST /index``: JSON per image, as one object (for every image) or a list aligned
    with the images, in the ``metadata`` field (multipart: one JSON text, or one JSON object per image)
    or the JSON body's ``"metadata"``. Each entry must be a JSON object (or null)."""
    if upload.json_body is not None:
        raw = upload.json_body.get("metadata")
        if raw is None:
            return [None] * count
        values = raw if isinstance(raw, list) else [raw]
    else:
        texts = upload.fields.get("metadata", [])
        if not texts:
            return [None] * count
        parsed = []
        for i, text in enumerate(texts):
            try:
                parsed.append(strict_json_loads(text))
            except ValueError as exc:
                raise UploadError(f"metadata{'' if len(texts) == 1 else f'[{i}]'} is not valid JSON: {exc}") from exc
        values = parsed[0] if len(parsed) == 1 and isinstance(parsed[0], list) else parsed
    entries = _per_image(list(values), count, "metadata")
    for i, entry in enumerate(entries):
        if entry is not None and not isinstance(entry, dict):
            raise UploadError(f"metadata[{i}] must be a JSON object or null, got {type(entry).__name__}")
        if entry is not None:
            check_json_value(entry, f"metadata[{i}]")
            if len(json.dumps(entry, ensure_ascii=False).encode()) > max_bytes:
                raise UploadError(f"metadata[{i}] is larger than {max_bytes} bytes of JSON")
    return entries
