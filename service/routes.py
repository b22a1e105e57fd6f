"""HTTP routes. Handlers only parse, delegate to :class:`service.state.ServiceState` and format:
decoding, inference, rendering and gallery disk work all run off the event loop."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path as FilePath
from types import ModuleType
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.convertors import Convertor, register_url_convertor

from dino.attention import mass_threshold_mask, select_head
from service.dependencies import get_state, require_api_key
from service.overlay import render_overlay
from service.preprocess import PreparedImage
from service.schemas import (
    AttentionResponse,
    EmbedResponse,
    GalleryItemsResponse,
    HealthResponse,
    IndexAddResponse,
    IndexDeleteResponse,
    IndexInfo,
    NeighborsResponse,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    ReadyResponse,
)
from service.state import ServiceState, l2_normalize
from service.uploads import (
    MULTIPART,
    SINGLE_IMAGE_FIELDS,
    VIDEO_FIELD,
    parse_labels,
    parse_metadata,
    read_openai_embedding_request,
    read_upload,
    read_video_upload,
    single_image,
)

STATIC_DIR = FilePath(__file__).resolve().parent / "static"
#: the files GET /static/{name} may serve (never a path built from client input)
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
ID_PATTERN = r"^[0-9a-f]{32}$"
ImageId = Annotated[str, Path(pattern=ID_PATTERN, description="gallery image id (32 hex digits)")]


class ImageIdConvertor(Convertor[str]):
    """Routes match ``{image_id:image_id}`` only for a well-formed id, so that ``/index/items`` is
    never taken for an image id (``DELETE /index/items`` is a 405, not a 422 about the id)."""

    regex = ID_PATTERN.strip("^$")

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("image_id", ImageIdConvertor())


#: a 16x16 PNG as a data URL: the request examples of the OpenAPI document, which contract tests send
EXAMPLE_IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAHUlEQVR42mNkYGgQYGAgHrEwCDCQBEY1jGoYOhoAH"
    "goCnoxpJwYAAAAASUVORK5CYII="
)


def _images_body(single: bool, gallery: bool = False) -> dict:
    """OpenAPI request body of the image routes (parsed by hand to accept multipart or JSON)."""
    # at most one image on a single-image route; service.openapi sets the others' bound from the settings
    bounds = {"minItems": 1, "maxItems": 1} if single else {"minItems": 1}
    files = {"type": "array", "items": {"type": "string", "format": "binary"}, **bounds}
    encoded = {
        "type": "array",
        "items": {"type": "string", "description": "base64 image (a data: URL is fine)"},
        **bounds,
    }
    multipart: dict[str, Any] = {"images": files}
    json_props: dict[str, Any] = {"images": encoded}
    if gallery:
        multipart["labels"] = {
            "type": "array",
            "items": {"type": "string"},
            "description": "one label for all, or one per image",
        }
        multipart["metadata"] = {
            "type": "string",
            "description": "JSON object for all images, or a JSON list of objects (one per image)",
        }
        json_props["labels"] = {
            "description": "one label for all images, or one per image; null: none",
            "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": ["string", "null"]}}, {"type": "null"}],
        }
        json_props["metadata"] = {
            "description": "one JSON object for all images, or one per image; null: none",
            "oneOf": [{"type": "object"}, {"type": "array", "items": {"type": ["object", "null"]}}, {"type": "null"}],
        }
    example: dict[str, Any] = {"images": [EXAMPLE_IMAGE]}
    if gallery:
        example.update(labels="example", metadata={"source": "the OpenAPI example"})
    note = "exactly one image" if single else "one or more images"
    return {
        "requestBody": {
            "required": True,
            "description": f"{note}: multipart files in the field 'images', or JSON with base64 strings",
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "properties": multipart, "required": ["images"]}},
                "application/json": {
                    "schema": {"type": "object", "properties": json_props, "required": ["images"]},
                    "example": example,
                },
            },
        }
    }


async def _json_off_loop(state: ServiceState, build) -> Response:
    """Build and serialise a (possibly large: patch tokens) JSON answer in the worker pool, not on the event loop."""
    content = await state.run_blocking(lambda: json.dumps(build(), allow_nan=False, separators=(",", ":")).encode())
    return Response(content=content, media_type="application/json")


def _parse_head(head: str, heads: int) -> int | None:
    if head == "mean":
        return None
    index = int(head)
    if not 0 <= index < heads:
        raise HTTPException(status_code=422, detail=f"head must be 'mean' or 0..{heads - 1}, got {head}")
    return index


def _check_k(k: int, state: ServiceState) -> None:
    if k > state.settings.max_neighbors:
        raise HTTPException(status_code=422, detail=f"k must be at most {state.settings.max_neighbors}")


# --------------------------------------------------------------------------------------------------
# health (never behind the API key)
# --------------------------------------------------------------------------------------------------

health_router = APIRouter(tags=["health"])


@health_router.get(
    "/healthz", operation_id="healthz", response_model=HealthResponse, summary="Liveness: the process answers"
)
@health_router.head("/healthz", include_in_schema=False)
async def healthz() -> dict:
    return {"status": "alive"}


@health_router.head("/readyz", include_in_schema=False)
@health_router.get(
    "/readyz", operation_id="readyz", response_model=ReadyResponse, summary="Readiness: model loaded and warmed up"
)
async def readyz(request: Request) -> dict:
    """503 while the model is not ready. A gallery whose backend is unreachable makes the answer
    "degraded" (still 200, with what is missing): /embed and /attention work without it, and every
    replica shares the one Milvus, so failing readiness would take all of them out of a load balancer."""
    state: ServiceState | None = request.app.state.service
    if state is None or not state.ready:
        raise HTTPException(status_code=503, detail="not ready: the model is loading or the server is stopping")
    health = state.gallery_health()
    return {
        "status": "ready" if health.available else "degraded",
        "model": state.model.name,
        "provider": state.model.provider,
        "model_file": state.model.file,
        "precision": state.model.precision,
        "gallery": {"backend": state.gallery.backend, "available": health.available, "detail": health.detail},
        "missing": [] if health.available else [health.detail],
    }


# --------------------------------------------------------------------------------------------------
# the API (behind the API key when one is set)
# --------------------------------------------------------------------------------------------------

# error answers are documented per route by service.openapi (which knows whether a key is set)
api_router = APIRouter(dependencies=[Depends(require_api_key)])
State = Annotated[ServiceState, Depends(get_state)]


@api_router.post(
    "/embed",
    operation_id="embed",
    tags=["features"],
    response_model=EmbedResponse,
    summary="[CLS] embeddings of one or more images",
    openapi_extra=_images_body(single=False),
)
async def embed(
    request: Request,
    state: State,
    normalize: Annotated[bool, Query(description="L2-normalise the embeddings")] = True,
    patch_tokens: Annotated[bool, Query(description="also return the patch tokens [N, D] of each image")] = False,
) -> Response:
    upload = await read_upload(request, max_images=state.settings.max_images_per_request)
    prepared = await state.prepare(upload.images, upload.names)
    outputs = ["embedding", "patch_tokens"] if patch_tokens else ["embedding"]
    results = await state.infer(prepared, outputs)

    def build() -> dict:
        embeddings = np.stack([r["embedding"] for r in results])
        if normalize:
            embeddings = l2_normalize(embeddings)
        body = {"model": state.model.name, "dim": int(embeddings.shape[1]), "embeddings": embeddings.tolist()}
        if patch_tokens:
            body["patch_tokens"] = [r["patch_tokens"].tolist() for r in results]
        return body

    return await _json_off_loop(state, build)


OPENAI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": OpenAIEmbeddingRequest.model_json_schema(),
                "example": {"input": [EXAMPLE_IMAGE], "model": None, "encoding_format": "float"},
            }
        },
    }
}


@api_router.post(
    "/v1/embeddings",
    operation_id="embeddings_openai",
    tags=["features"],
    response_model=OpenAIEmbeddingResponse,
    summary="[CLS] embeddings in the format of OpenAI's embeddings API (images as base64 or data URLs)",
    openapi_extra=OPENAI_BODY,
)
async def embeddings_openai(request: Request, state: State) -> Response:
    """For tooling written against OpenAI's embeddings API: same model, limits, batching and API key
    as /embed; the embeddings are L2-normalised, as OpenAI's are."""
    body = await read_openai_embedding_request(request, max_images=state.settings.max_images_per_request)
    name, dim = state.model.name, state.model.spec.embed_dim
    if body.model is not None and body.model != name:
        raise HTTPException(
            status_code=404, detail=f"model {body.model!r} is not served here; this server serves {name!r}"
        )
    if body.dimensions is not None and body.dimensions != dim:
        raise HTTPException(
            status_code=422, detail=f"dimensions must be {dim}, the model's embedding size (got {body.dimensions})"
        )
    prepared = await state.prepare(body.images, [""] * len(body.images))
    embeddings = await state.embed(prepared)
    rows, cols = state.model.spec.grid
    tokens = len(prepared) * (rows * cols + 1)

    def build() -> dict:
        vectors = np.asarray(embeddings, dtype=np.float32)  # L2-normalised by state.embed
        if body.encoding_format == "base64":
            encoded: list = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            encoded = vectors.tolist()
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": name, "usage": usage}

    return await _json_off_loop(state, build)


async def _attention_answer(
    state: ServiceState, prepared: PreparedImage, head: str, fmt: str, threshold: float | None
) -> Response:
    spec = state.model.spec
    head_index = _parse_head(head, spec.num_heads)
    (result,) = await state.infer([prepared], ["attention"])
    grid = spec.grid
    attention_map = select_head(result["attention"], grid, head_index)
    mask = mass_threshold_mask(attention_map, threshold) if threshold is not None else None
    if fmt == "json":
        body = {
            "model": spec.name,
            "grid": list(grid),
            "heads": spec.num_heads,
            "head": "mean" if head_index is None else head_index,
            "attention": attention_map.tolist(),
        }
        if mask is not None:
            body["mask"] = mask.tolist()
        return JSONResponse(body)
    png = await state.run_blocking(render_overlay, prepared.crop, attention_map, mask)
    return Response(content=png, media_type="image/png")


HeadQuery = Annotated[
    str, Query(pattern=r"^(mean|\d{1,4})$", description="attention head index, or 'mean' for the average over heads")
]
FormatQuery = Annotated[
    Literal["png", "json"], Query(description="png: heatmap over the input crop; json: the grid of weights")
]
ThresholdQuery = Annotated[
    float | None, Query(gt=0, le=1, description="keep the patches holding this fraction of the attention mass (DINO)")
]
ATTENTION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"image/png": {}, "application/json": {"schema": AttentionResponse.model_json_schema()}},
        "description": "the attention map (PNG overlay or JSON)",
    },
}


@api_router.post(
    "/attention",
    operation_id="attention",
    tags=["features"],
    summary="DINO [CLS] attention map of one image",
    openapi_extra=_images_body(single=True),
    response_class=Response,
    responses=ATTENTION_RESPONSES,
)
async def attention(
    request: Request,
    state: State,
    head: HeadQuery = "mean",
    format: FormatQuery = "png",
    threshold: ThresholdQuery = None,
) -> Response:
    upload = await read_upload(
        request, max_images=state.settings.max_images_per_request, field_names=SINGLE_IMAGE_FIELDS
    )
    (prepared,) = await state.prepare([single_image(upload)], upload.names)
    return await _attention_answer(state, prepared, head, format, threshold)


async def _stored_crop(state: ServiceState, image_id: str) -> PreparedImage:
    data = await state.run_gallery(state.gallery.read_image, image_id)

    def decode() -> PreparedImage:
        with Image.open(io.BytesIO(data)) as img:
            return state.preprocessor.prepare_crop(img.convert("RGB"))

    return await state.run_blocking(decode)


@api_router.get(
    "/attention/{image_id:image_id}",
    operation_id="attention_of_stored",
    tags=["features"],
    summary="DINO [CLS] attention map of a gallery image (openable by URL)",
    response_class=Response,
    responses=ATTENTION_RESPONSES,
)
async def attention_of_stored(
    image_id: ImageId,
    state: State,
    head: HeadQuery = "mean",
    format: FormatQuery = "png",
    threshold: ThresholdQuery = None,
) -> Response:
    prepared = await _stored_crop(state, image_id)
    return await _attention_answer(state, prepared, head, format, threshold)


# --------------------------------------------------------------------------------------------------
# attention on video (PyAV is the optional 'video' extra: service.video is imported on first use)
# --------------------------------------------------------------------------------------------------

#: highest output frame rate of POST /attention/video
MAX_VIDEO_FPS = 60
#: smallest side of the frames of an attention clip
MIN_VIDEO_SIZE = 16
#: default side of the frames of an attention clip (service.video.DEFAULT_OUTPUT_SIZE, which needs PyAV)
VIDEO_SIZE = 256
VIDEO_MEDIA_TYPES = {"mp4": "video/mp4", "zip": "application/zip"}
VIDEO_BODY = {
    "requestBody": {
        "required": True,
        "description": "a short clip (MP4/MOV, Matroska/WebM or AVI; H.264, HEVC, VP8, VP9, AV1, MPEG-4 or MJPEG) "
        f"as a multipart file in the field '{VIDEO_FIELD}'",
        "content": {
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "properties": {VIDEO_FIELD: {"type": "string", "format": "binary", "description": "the clip"}},
                    "required": [VIDEO_FIELD],
                    "additionalProperties": False,
                }
            }
        },
    }
}
VIDEO_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the attention clip: an MP4 (H.264), or a ZIP of the PNG overlays (frame_000000.png, ...) and "
        "attention.json (the grid of weights of every frame, with the model, head, threshold and fps)",
        "content": {
            "video/mp4": {"schema": {"type": "string", "format": "binary"}},
            "application/zip": {"schema": {"type": "string", "format": "binary"}},
        },
        "headers": {
            "X-Frame-Count": {"description": "frames in the clip", "schema": {"type": "integer"}},
            "X-Frame-Rate": {"description": "frames per second of the clip", "schema": {"type": "number"}},
        },
    },
}
FpsQuery = Annotated[
    float | None,
    Query(
        gt=0,
        le=MAX_VIDEO_FPS,
        description="frame rate of the clip: the video is sampled at this rate (default: its own, at most "
        f"{MAX_VIDEO_FPS}); never above the video's own rate",
    ),
]
VideoFormatQuery = Annotated[
    Literal["mp4", "zip"], Query(description="mp4: an H.264 clip; zip: the PNG overlays and attention.json")
]
VideoSizeQuery = Annotated[
    int,
    Query(
        ge=MIN_VIDEO_SIZE,
        multiple_of=2,
        description="side of the clip's frames in pixels (even; at most DINO_MAX_VIDEO_OUTPUT_SIZE). The model's "
        "image size gives exactly the PNGs of POST /attention",
    ),
]


def _video_error_status(video: ModuleType, exc: Exception) -> int:
    """413 for a clip over the limits, 415 for one that is not a supported video, 422 for a corrupt one."""
    if isinstance(exc, video.VideoTooLarge):
        return 413
    return 415 if isinstance(exc, video.UnsupportedVideo) else 422


@api_router.post(
    "/attention/video",
    operation_id="attention_video",
    tags=["features"],
    summary="DINO [CLS] attention of every frame of a short clip, as a clip (MP4, or a ZIP of PNG frames)",
    openapi_extra=VIDEO_BODY,
    response_class=Response,
    responses=VIDEO_RESPONSES,
)
async def attention_video(
    request: Request,
    state: State,
    head: HeadQuery = "mean",
    threshold: ThresholdQuery = None,
    fps: FpsQuery = None,
    size: VideoSizeQuery = VIDEO_SIZE,
    format: VideoFormatQuery = "mp4",
) -> Response:
    """Each sampled frame goes through the model's transform and the dynamic batcher like an image of
    POST /attention, and its overlay is that route's PNG, drawn at ``size``. Decoding, rendering and
    encoding run in the worker pool, a chunk of frames at a time, so memory stays bounded."""
    try:
        from service import video
    except ModuleNotFoundError as exc:
        if exc.name != "av":
            raise
        raise HTTPException(
            status_code=501,
            detail="video support is not installed in this server: pip install 'dino-platform[serve,video]'",
        ) from exc
    settings, spec = state.settings, state.model.spec
    head_index = _parse_head(head, spec.num_heads)  # before the upload is read or a frame decoded
    if size > settings.max_video_output_size:
        raise HTTPException(status_code=422, detail=f"size must be at most {settings.max_video_output_size}")
    data = await read_video_upload(request, settings.max_video_bytes)
    limits = video.VideoLimits(
        max_frames=settings.max_video_frames,
        truncate=False,  # a clip over the limits is refused (413), never silently cut
        max_seconds=settings.max_video_seconds,
        max_frame_pixels=settings.max_video_frame_pixels,
        max_fps=MAX_VIDEO_FPS,
    )
    info = {
        "model": spec.name,
        "grid": list(spec.grid),
        "heads": spec.num_heads,
        "head": "mean" if head_index is None else head_index,
        "threshold": threshold,
    }
    try:
        # opening reads the packets of the whole clip (no decoding): it takes a decoding slot like an image
        async with state.decode_slots:
            source = await state.run_blocking(video.VideoFileSource, data, fps, limits)
        writer = await state.run_blocking(video.open_writer, None, format, source.fps, size, info)
        preparer = video.FramePreparer(state.preprocessor.transform, size)
        clip = video.AttentionClip(source, preparer, writer, spec.grid, head_index, threshold)
        try:
            while True:
                async with state.decode_slots:
                    chunk = await state.run_blocking(clip.next_chunk, state.batcher.max_batch_size)
                if not chunk:
                    break
                results = await state.infer([frame.prepared for frame in chunk], ["attention"])
                await state.run_blocking(clip.write, chunk, [result["attention"] for result in results])
            body = await state.run_blocking(clip.finish)
        finally:
            await state.run_blocking(clip.close)
    except video.VideoInputError as exc:
        # here rather than in service.app, which must not need PyAV to start
        raise HTTPException(status_code=_video_error_status(video, exc), detail=exc.detail) from exc
    headers = {
        "X-Frame-Count": str(clip.frames),
        "X-Frame-Rate": f"{float(clip.fps):g}",
        "Content-Disposition": f'inline; filename="attention.{format}"',
    }
    return Response(content=body, media_type=VIDEO_MEDIA_TYPES[format], headers=headers)


def _neighbors_body(state: ServiceState, query: np.ndarray, k: int, exclude: str | None) -> dict:
    found = state.gallery.search(query, k, exclude=exclude)
    neighbors = [{"id": n.id, "score": n.score, "label": n.label, "metadata": n.metadata} for n in found]
    return {"neighbors": neighbors}


KQuery = Annotated[int, Query(ge=1, description="number of neighbours")]


@api_router.post(
    "/neighbors",
    operation_id="neighbors",
    tags=["gallery"],
    response_model=NeighborsResponse,
    summary="Nearest gallery images of one image",
    openapi_extra=_images_body(single=True),
)
async def neighbors(request: Request, state: State, k: KQuery = 10) -> Response:
    _check_k(k, state)
    upload = await read_upload(
        request, max_images=state.settings.max_images_per_request, field_names=SINGLE_IMAGE_FIELDS
    )
    prepared = await state.prepare([single_image(upload)], upload.names)
    (query,) = await state.embed(prepared)
    return JSONResponse(await state.run_gallery(_neighbors_body, state, query, k, None))


@api_router.get(
    "/neighbors/{image_id:image_id}",
    operation_id="neighbors_of_stored",
    tags=["gallery"],
    response_model=NeighborsResponse,
    summary="Nearest gallery images of a gallery image (itself excluded)",
)
async def neighbors_of_stored(image_id: ImageId, state: State, k: KQuery = 10) -> Response:
    _check_k(k, state)
    query = await state.run_gallery(state.gallery.embedding, image_id)
    return JSONResponse(await state.run_gallery(_neighbors_body, state, query, k, image_id))


@api_router.post(
    "/index",
    operation_id="index_add",
    tags=["gallery"],
    response_model=IndexAddResponse,
    summary="Add images to the gallery (answered once durable)",
    openapi_extra=_images_body(single=False, gallery=True),
)
async def index_add(request: Request, state: State) -> dict:
    state.gallery.check_writable()  # before any upload is read or image decoded
    upload = await read_upload(request, max_images=state.settings.max_images_per_request)
    count = len(upload.images)
    labels = parse_labels(upload, count, state.settings.max_label_chars)
    metadata = parse_metadata(upload, count, state.settings.max_metadata_bytes)
    prepared = await state.prepare(upload.images, upload.names)
    embeddings = await state.embed(prepared)
    thumbnails = await asyncio.gather(*(state.run_blocking(state.thumbnail, p.crop) for p in prepared))
    ids = await state.run_gallery(state.gallery.add, embeddings, labels, metadata, thumbnails)
    state.metrics.gallery_size.set(state.gallery.size)
    return {"ids": ids}


@api_router.get(
    "/index",
    operation_id="index_info",
    tags=["gallery"],
    response_model=IndexInfo,
    summary="Gallery size, dimension, model, backend and index type",
)
async def index_info(state: State) -> dict:
    return await state.run_gallery(state.gallery.info)


@api_router.get(
    "/index/items",
    operation_id="index_items",
    tags=["gallery"],
    response_model=GalleryItemsResponse,
    summary="The gallery's entries (id, label, metadata), a page at a time, in the order they were added",
)
async def index_items(
    state: State,
    offset: Annotated[int, Query(ge=0, description="entries to skip")] = 0,
    limit: Annotated[int, Query(ge=1, description="most entries to return (at most DINO_MAX_PAGE_SIZE)")] = 100,
) -> Response:
    if limit > state.settings.max_page_size:
        raise HTTPException(status_code=422, detail=f"limit must be at most {state.settings.max_page_size}")
    total, items = await state.run_gallery(state.gallery.items, offset, limit)
    return JSONResponse({"total": total, "offset": offset, "items": items})


@api_router.delete(
    "/index/{image_id:image_id}",
    operation_id="index_delete",
    tags=["gallery"],
    response_model=IndexDeleteResponse,
    summary="Remove an image from the gallery",
)
async def index_delete(image_id: ImageId, state: State) -> dict:
    await state.run_gallery(state.gallery.delete, image_id)
    state.metrics.gallery_size.set(state.gallery.size)
    return {"id": image_id, "deleted": True}


@api_router.get(
    "/index/{image_id:image_id}/image",
    operation_id="index_image",
    tags=["gallery"],
    summary="The stored gallery image (the model's centre crop, JPEG)",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}},
)
async def index_image(image_id: ImageId, state: State) -> Response:
    data = await state.run_gallery(state.gallery.read_image, image_id)
    # an id always names the same image: let browsers cache it (privately: it may be behind the API key)
    return Response(content=data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


@api_router.get(
    "/metrics", operation_id="metrics", tags=["health"], summary="Prometheus metrics", response_class=Response
)
async def metrics(request: Request) -> Response:
    state: ServiceState | None = request.app.state.service
    registry = request.app.state.metrics
    if state is not None:
        state.gallery_health()  # sets the gallery gauges (no I/O)
    body, content_type = registry.render()
    return Response(content=body, media_type=content_type)


# --------------------------------------------------------------------------------------------------
# the page and the API docs (behind the API key too: "every route but /healthz and /readyz")
# --------------------------------------------------------------------------------------------------

ui_router = APIRouter(dependencies=[Depends(require_api_key)], include_in_schema=False)


@ui_router.get("/", response_class=HTMLResponse)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@ui_router.get("/static/{name}")
async def static_file(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise HTTPException(status_code=404, detail="not found")
    return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name])


@ui_router.get("/openapi.json")
async def openapi_schema(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@ui_router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - API docs")
