"""Response models of the HTTP API (they document the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    """Every error answer: ``{"detail": "<message>"}`` (:func:`error_body`)."""

    detail: str = Field(description="what went wrong, in one message")


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(ErrorResponse):
    """The errors of the OpenAI-style routes (``/v1/...``): ``detail`` as everywhere, plus OpenAI's
    ``error`` object, whose message OpenAI's clients show."""

    error: OpenAIError


#: path prefix of the routes that follow OpenAI's API
OPENAI_PREFIX = "/v1/"
#: OpenAI's error type for each status
OPENAI_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


def error_body(path: str, status: int, detail: str) -> dict[str, Any]:
    """The JSON of an error answer to a request for ``path``: ``{"detail": ...}``, and on the
    OpenAI-style routes also ``{"error": {"message", "type", "param", "code"}}``."""
    body: dict[str, Any] = {"detail": detail}
    if path.startswith(OPENAI_PREFIX):
        kind = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        body["error"] = {"message": detail, "type": kind, "param": None, "code": None}
    return body


class EmbedResponse(BaseModel):
    model: str = Field(description="name of the served model")
    dim: int = Field(description="embedding dimension D")
    embeddings: list[list[float]] = Field(description="one [CLS] embedding per image, in request order")
    patch_tokens: list[list[list[float]]] | None = Field(
        None, description="with ?patch_tokens=true: per image, N patch tokens of D values (never L2-normalised)"
    )


class AttentionResponse(BaseModel):
    model: str
    grid: list[int] = Field(description="[rows, columns] of the patch grid")
    heads: int = Field(description="number of attention heads H")
    head: int | str = Field(description="the head shown, or 'mean' (average over heads)")
    attention: list[list[float]] = Field(description="rows x columns [CLS] attention weights (softmax values)")
    mask: list[list[bool]] | None = Field(
        None, description="with ?threshold: the patches holding that fraction of the mass"
    )


class Neighbor(BaseModel):
    id: str
    score: float = Field(description="cosine similarity (inner product of L2-normalised embeddings)")
    label: str | None
    metadata: dict[str, Any] | None


class NeighborsResponse(BaseModel):
    neighbors: list[Neighbor] = Field(description="best first")


class IndexAddResponse(BaseModel):
    ids: list[str] = Field(description="ids of the added images, in request order")


class IndexDeleteResponse(BaseModel):
    id: str
    deleted: bool


class GalleryItem(BaseModel):
    id: str
    label: str | None
    metadata: dict[str, Any] | None


class GalleryItemsResponse(BaseModel):
    total: int = Field(description="images in the gallery")
    offset: int
    items: list[GalleryItem] = Field(description="in the order they were added")


class IndexInfo(BaseModel):
    size: int
    dim: int
    model: str
    model_sha256: str
    backend: str = Field(description="faiss (the index folder) or milvus")
    index_type: str = Field(description="faiss: flat (exact) or hnsw; milvus: HNSW, FLAT, IVF_FLAT or AUTOINDEX")
    persistent: bool = Field(description="false for an in-memory gallery (no index folder)")
    read_only: bool
    collection: str | None = Field(None, description="the Milvus collection (milvus backend)")


class HealthResponse(BaseModel):
    status: str


class GalleryStatus(BaseModel):
    backend: str = Field(description="faiss or milvus")
    available: bool = Field(description="false while the gallery's backend cannot be reached")
    detail: str | None = Field(None, description="why the gallery is unavailable")


class ReadyResponse(BaseModel):
    status: str = Field(description="ready, or degraded: the model serves but the gallery is unavailable")
    model: str
    provider: str = Field(description="the active onnxruntime execution provider")
    model_file: str = Field(description="the file of the model folder being served, e.g. model_int8.onnx")
    precision: Literal["fp32", "int8", "fp16"] = Field(description="the precision of that file (DINO_PRECISION)")
    gallery: GalleryStatus
    missing: list[str] = Field(default_factory=list, description="what does not work now, and why")


# --------------------------------------------------------------------------------------------------
# POST /v1/embeddings: OpenAI's embeddings API
# --------------------------------------------------------------------------------------------------


class OpenAIEmbeddingRequest(BaseModel):
    """The request body of ``POST /v1/embeddings`` (documentation; :mod:`service.uploads` parses it)."""

    input: str | list[str] = Field(
        description="one image or a list of images, each base64 or a data:image/...;base64, URL"
    )
    model: str | None = Field(None, description="the served model's name (GET /index or /readyz); optional")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: a list of numbers; base64: the little-endian float32 bytes, base64-encoded"
    )
    dimensions: int | None = Field(None, description="must equal the model's embedding dimension when given")
    user: str | None = Field(None, description="accepted and ignored")


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int = Field(description="position of the image in the input")
    embedding: list[float] | str = Field(description="the L2-normalised [CLS] embedding (base64 with encoding_format)")


class OpenAIUsage(BaseModel):
    prompt_tokens: int = Field(description="tokens the Vision Transformer processed: per image, its patches and [CLS]")
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage
