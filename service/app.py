"""The FastAPI application factory.

``create_app(settings)`` builds the app; its lifespan loads and warms up the model and opens the
gallery before the server accepts requests (so /readyz answers 200 only once the model is warm),
and closes everything at shutdown. ``create_app_from_env`` is the factory ``dino serve`` gives to
uvicorn (settings from ``DINO_*`` environment variables).

Errors: every error answer is JSON ``{"detail": "<message>"}``. Client mistakes map to 4xx through the
handlers below; anything unexpected is logged with its traceback and answered with a plain 500
``{"detail": "internal server error"}`` (no traceback leaks to the client).
"""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dino.images import ImageInputError, ImageTooLarge, UnsupportedImage
from dino.model_folder import METADATA_FILE
from service.batching import BatcherStoppedError, QueueFullError
from service.gallery import (
    GalleryEntryTooLarge,
    GalleryReadOnlyError,
    GalleryUnavailableError,
    UnknownImageError,
)
from service.metrics import MetricsMiddleware, ServiceMetrics
from service.openapi import allowed_methods, install_exact_openapi
from service.routes import api_router, health_router, ui_router
from service.runtime import ModelSpec
from service.schemas import error_body
from service.settings import ServiceSettings
from service.state import RequestTooLarge, load_state
from service.uploads import BodySizeLimitMiddleware

log = logging.getLogger(__name__)

API_DESCRIPTION = """Features of a DINO self-supervised Vision Transformer, served with onnxruntime.

Images go in as multipart files in the field `images` or as JSON `{"images": ["<base64>", ...]}`;
`POST /attention/video` takes a short clip as a multipart file in the field `video`.
Every error is JSON `{"detail": "<message>"}`. When the server has an API key (`DINO_API_KEY`), every route
except `/healthz` and `/readyz` needs `Authorization: Bearer <key>`.
"""


#: status recorded for a request whose client left before it was read (nginx's convention)
CLIENT_CLOSED_REQUEST = 499
#: the HTTP answer to each kind of unusable image (:mod:`dino.images`); anything else is a 422
IMAGE_ERROR_STATUS: dict[type[ImageInputError], int] = {ImageTooLarge: 413, UnsupportedImage: 415}


def image_error_status(exc: ImageInputError) -> int:
    """413 for too large, 415 for not an image or an unsupported mode, 422 for empty or corrupt data."""
    for kind, status in IMAGE_ERROR_STATUS.items():
        if isinstance(exc, kind):
            return status
    return 422


def _error(request: Request, status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, status, detail), status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> str:
    """FastAPI's list of validation errors as one message: "query parameter 'k': Input should be ..."."""
    messages = []
    for error in exc.errors():
        where, *path = error.get("loc", ()) or ("request",)
        name = ".".join(str(part) for part in path)
        place = f"{where} parameter {name!r}" if where in ("query", "path", "header") and name else str(where)
        messages.append(f"{place}: {error.get('msg', 'invalid')}")
    return "; ".join(messages) or "invalid request"


def install_exception_handlers(app: FastAPI) -> None:
    """Map the service's exceptions to JSON answers ``{"detail": "<message>"}``."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(request, 422, validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route of the path only; a path can have several
            routes = [*health_router.routes, *api_router.routes, *ui_router.routes]
            headers["Allow"] = ", ".join(allowed_methods(routes, request.url.path))
        return _error(request, exc.status_code, str(exc.detail), headers)

    @app.exception_handler(ImageInputError)
    async def image_input_error(request: Request, exc: ImageInputError) -> JSONResponse:
        return _error(request, image_error_status(exc), exc.detail)

    @app.exception_handler(UnknownImageError)
    async def unknown_image(request: Request, exc: UnknownImageError) -> JSONResponse:
        detail = f"no gallery image with id {exc.args[0]!r}" if exc.args else "no such gallery image"
        return _error(request, 404, detail)

    @app.exception_handler(GalleryReadOnlyError)
    async def read_only(request: Request, exc: GalleryReadOnlyError) -> JSONResponse:
        return _error(request, 409, str(exc))

    @app.exception_handler(GalleryUnavailableError)
    async def gallery_unavailable(request: Request, exc: GalleryUnavailableError) -> JSONResponse:
        retry_after = max(1, math.ceil(app.state.settings.milvus_retry_interval))
        return _error(request, 503, str(exc), {"Retry-After": str(retry_after)})

    @app.exception_handler(GalleryEntryTooLarge)
    async def entry_too_large(request: Request, exc: GalleryEntryTooLarge) -> JSONResponse:
        return _error(request, 413, str(exc))

    @app.exception_handler(RequestTooLarge)
    async def request_too_large(request: Request, exc: RequestTooLarge) -> JSONResponse:
        return _error(request, 413, str(exc))

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        return _error(request, 503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(BatcherStoppedError)
    async def stopped(request: Request, exc: BatcherStoppedError) -> JSONResponse:
        return _error(request, 503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # nobody is left to answer: not a server error, and not worth a traceback in the log
        log.info("client disconnected before its request was read: %s %s", request.method, request.url.path)
        return _error(request, CLIENT_CLOSED_REQUEST, "client closed the connection before the request was read")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        # the server closes the connection after an unhandled error: say so, or the client's next
        # request on this keep-alive connection fails too
        return _error(request, 500, "internal server error", {"Connection": "close"})


def _gallery_place(settings: ServiceSettings) -> str:
    """Where the gallery is, for the startup log (no credentials)."""
    if settings.gallery == "milvus":
        from service.gallery.milvus_schema import public_uri

        return f"in Milvus at {public_uri(settings.milvus_uri or '')}"
    return str(settings.index_dir or "in memory")


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """Build the service app. The model folder is resolved now (a missing model fails here, clearly);
    the model itself is loaded when the app starts (lifespan)."""
    settings = settings or ServiceSettings()
    model_dir = settings.resolved_model_dir()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = await asyncio.to_thread(load_state, settings, metrics, model_dir)
        app.state.service = state
        await state.start()
        log.info(
            "ready: model %s on %s, gallery %s (%d images)",
            state.model.name,
            state.model.provider,
            _gallery_place(settings),
            state.gallery.size,
        )
        try:
            yield
        finally:
            app.state.service = None
            await state.stop()

    app = FastAPI(
        title="DINO feature service",
        description=API_DESCRIPTION,
        version="1.0.0",
        lifespan=lifespan,
        # /docs and /openapi.json are served by ui_router, behind the API key like every other route
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = None
    app.include_router(health_router)
    app.include_router(api_router)
    app.include_router(ui_router)
    install_exception_handlers(app)

    def num_heads() -> int:
        state = app.state.service
        if state is not None:
            return state.model.spec.num_heads
        return ModelSpec.from_json(model_dir / METADATA_FILE).num_heads

    install_exact_openapi(app, settings, num_heads)

    # add_middleware wraps what is there: the last added is the outermost
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes, body_timeout=settings.body_timeout)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def create_app_from_env() -> FastAPI:
    """Factory for uvicorn (``dino serve``): settings from the ``DINO_*`` environment."""
    return create_app(ServiceSettings())
