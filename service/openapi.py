"""The service's OpenAPI document, made to describe exactly what the server answers.

FastAPI generates the document from the routes. Some of what a client needs to know is only known
once the settings and the model are: the largest ``k``, the most images per request, the heads of
the model, whether an API key is needed. And FastAPI documents its own validation error (``detail``
as a list of objects) where this service answers ``{"detail": "<message>"}``. :func:`exact_openapi`
starts from FastAPI's document and fixes those:

- one error schema, :class:`service.schemas.ErrorResponse`, for every 4xx and 5xx answer, with the
  status codes each route can give (the OpenAI-style ``/v1/`` routes add OpenAI's ``error`` object);
- the settings' limits as schema constraints (``maxItems``, ``maximum``, ``maxLength``) and the
  model's heads as the ``head`` pattern;
- the bearer scheme only when the server has a key, and only on the routes behind it;
- OpenAPI links from ``POST /index`` (which returns ids) to the routes that take an id, so that a
  tool can follow the gallery's flows from the document alone.

:func:`allowed_methods` gives the ``Allow`` header of a 405 answer: every method of every route of
the path, where Starlette names only the first route's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.routing import BaseRoute

from service.schemas import OPENAI_PREFIX, ErrorResponse, OpenAIErrorResponse
from service.settings import ServiceSettings

#: what each error status means, for every route that can give it
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "malformed request body (multipart that cannot be parsed, invalid Content-Length)",
    401: "missing or invalid API key",
    404: "no gallery image with this id, or a model that this server does not serve",
    408: "the client stopped sending the request body",
    409: "the gallery is read-only in this server",
    413: "request body, image, video or number of images over the limits",
    415: "not an image, an unsupported image mode, not a video in a supported format and codec, or an unsupported "
    "content type or encoding",
    422: "invalid parameters, an empty or corrupt image or video",
    501: "this server was installed without video support (the 'video' extra: PyAV)",
    503: "the model is loading, the inference queue is full or the gallery's backend is unreachable; "
    "retry after Retry-After seconds",
}
#: statuses of every route behind the API key (503: the model is not ready yet)
API_ERRORS = (422, 503)
#: statuses of the routes that read a request body
BODY_ERRORS = (400, 408, 413, 415, 422)
#: the routes of one gallery image, linked from POST /index: link name -> operationId
ID_ROUTES = {
    "GetStoredImage": "index_image",
    "GetAttentionOfStoredImage": "attention_of_stored",
    "GetNeighborsOfStoredImage": "neighbors_of_stored",
    "DeleteStoredImage": "index_delete",
}
#: status codes of each operation beyond API_ERRORS (and 401 when a key is set)
ROUTE_ERRORS: dict[str, tuple[int, ...]] = {
    "embed": BODY_ERRORS,
    "embeddings_openai": (*BODY_ERRORS, 404),
    "attention": BODY_ERRORS,
    "attention_of_stored": (404,),
    "attention_video": (*BODY_ERRORS, 501),
    "neighbors": BODY_ERRORS,
    "neighbors_of_stored": (404,),
    "index_add": (*BODY_ERRORS, 409),
    "index_info": (),
    "index_items": (),
    "index_delete": (404, 409),
    "index_image": (404,),
    "metrics": (),
}
#: operations that are open to everyone (no API key) and their errors
PUBLIC_ROUTES: dict[str, tuple[int, ...]] = {"healthz": (), "readyz": (503,)}
ERROR_SCHEMA = "ErrorResponse"
#: the errors of the /v1/ routes: ErrorResponse plus OpenAI's "error" object
OPENAI_ERROR_SCHEMA = "OpenAIErrorResponse"
BEARER_SCHEME = "HTTPBearer"


def head_pattern(num_heads: int) -> str:
    """The ``head`` parameter's values: ``mean`` or a head index of the model."""
    return "^(mean|" + "|".join(str(i) for i in range(num_heads)) + ")$"


def _error_response(status: int, schema: str = ERROR_SCHEMA) -> dict[str, Any]:
    return {
        "description": ERROR_DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _set_image_bounds(operation: dict[str, Any], max_images: int, max_label_chars: int) -> None:
    body = operation.get("requestBody", {}).get("content", {})
    for media in body.values():
        properties = media.get("schema", {}).get("properties", {})
        images = properties.get("images")
        if images is not None and images.get("type") == "array":
            images.setdefault("maxItems", max_images)  # single-image routes declare their own 1
        labels = properties.get("labels")
        if labels is None:
            continue
        variants = labels.get("oneOf", [labels])
        for variant in variants:
            if variant.get("type") == "array":
                variant["maxItems"] = max_images
                variant["items"]["maxLength"] = max_label_chars
            elif variant.get("type") == "string":
                variant["maxLength"] = max_label_chars


def _set_parameter_bounds(operation: dict[str, Any], settings: ServiceSettings, num_heads: int) -> None:
    for parameter in operation.get("parameters", []):
        schema = parameter.get("schema", {})
        name = parameter.get("name")
        if name == "k":
            schema["maximum"] = settings.max_neighbors
        elif name == "limit":
            schema["maximum"] = settings.max_page_size
        elif name == "head":
            schema["pattern"] = head_pattern(num_heads)
        elif name == "size" and operation.get("operationId") == "attention_video":
            schema["maximum"] = settings.max_video_output_size


def exact_openapi(app: FastAPI, settings: ServiceSettings, num_heads: int) -> dict[str, Any]:
    """The OpenAPI document of ``app`` as configured by ``settings``, for a model of ``num_heads`` heads."""
    # a copy: FastAPI's document shares the routes' openapi_extra dicts, which other apps (other settings) reuse
    document = copy.deepcopy(
        get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    )
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for fastapi_only in ("HTTPValidationError", "ValidationError"):
        schemas.pop(fastapi_only, None)
    schemas[ERROR_SCHEMA] = ErrorResponse.model_json_schema()
    openai_error = OpenAIErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(openai_error.pop("$defs", {}))
    schemas[OPENAI_ERROR_SCHEMA] = openai_error
    keyed = settings.api_key is not None
    if not keyed:
        components.pop("securitySchemes", None)

    for path, path_item in document["paths"].items():
        for operation in path_item.values():
            operation_id = operation["operationId"]
            responses = operation.setdefault("responses", {})
            for status in [s for s in responses if s.isdigit() and int(s) >= 400]:
                del responses[status]
            if operation_id in PUBLIC_ROUTES:
                statuses: tuple[int, ...] = PUBLIC_ROUTES[operation_id]
                operation.pop("security", None)
            else:
                statuses = (*API_ERRORS, *ROUTE_ERRORS[operation_id], *((401,) if keyed else ()))
                if keyed:
                    operation["security"] = [{BEARER_SCHEME: []}]
                else:
                    operation.pop("security", None)
            schema = OPENAI_ERROR_SCHEMA if path.startswith(OPENAI_PREFIX) else ERROR_SCHEMA
            for status in sorted(set(statuses)):
                responses[str(status)] = _error_response(status, schema)
            _set_parameter_bounds(operation, settings, num_heads)
            _set_image_bounds(operation, settings.max_images_per_request, settings.max_label_chars)
            if operation_id == "index_add":
                responses["200"]["links"] = {
                    name: {
                        "operationId": target,
                        "parameters": {"image_id": "$response.body#/ids/0"},
                        "description": "the first image added (ids are in request order)",
                    }
                    for name, target in ID_ROUTES.items()
                }
    return document


def install_exact_openapi(app: FastAPI, settings: ServiceSettings, num_heads: Callable[[], int]) -> None:
    """Make ``app.openapi()`` (served at /openapi.json) return :func:`exact_openapi`, built once, on
    first use (``num_heads`` reads the model's head count then)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = exact_openapi(app, settings, num_heads())
        return app.openapi_schema

    # FastAPI's documented way to customise the document: replace the method
    app.openapi = openapi  # type: ignore[method-assign]


def allowed_methods(routes: Iterable[BaseRoute], path: str) -> list[str]:
    """Every method that some route of ``path`` accepts (the ``Allow`` header of a 405). ``routes``
    are the routes of the routers the app includes (FastAPI wraps included routers in its own
    route objects, so ``app.routes`` is not a flat list of them)."""
    methods: set[str] = set()
    for route in routes:
        regex = getattr(route, "path_regex", None)
        route_methods = getattr(route, "methods", None)
        if regex is not None and route_methods and regex.match(path):
            methods |= route_methods
    return sorted(methods)
