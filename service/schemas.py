"""Response models of the HTTP API (they document the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    """Every error answer: ``{"detail": ...}``."""

    detail: Any = Field(description="what went wrong (a message, or a list of validation errors)")


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
    gallery: GalleryStatus
    missing: list[str] = Field(default_factory=list, description="what does not work now, and why")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or invalid API key (when DINO_API_KEY is set)"},
    413: {"model": ErrorResponse, "description": "body, image or image count over the limits"},
    415: {"model": ErrorResponse, "description": "not an image, or an unsupported content type"},
    422: {"model": ErrorResponse, "description": "invalid parameters or corrupt image"},
    503: {"model": ErrorResponse, "description": "model not ready, inference queue full or gallery unavailable"},
}
GALLERY_UNAVAILABLE: dict[str, Any] = {
    "model": ErrorResponse,
    "description": "the gallery's backend (Milvus) cannot be reached right now; retry after Retry-After seconds",
}
