"""Open the gallery the settings ask for, and check a multi-process setup before it starts.

``DINO_GALLERY=faiss`` (the default): the index folder ``DINO_INDEX_DIR`` (or memory), embedded,
nothing to start; one process writes it, ``--workers N`` serve it read-only.
``DINO_GALLERY=milvus``: the collection at ``DINO_MILVUS_URI``; with a Milvus server every process
(workers, replicas, machines) adds, deletes and searches.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.gallery.base import Gallery, GalleryError
from service.gallery.faiss_store import EmbeddingIndex, check_shared_reading
from service.gallery.milvus_schema import is_server_uri, lite_path
from service.settings import ServiceSettings

if TYPE_CHECKING:
    from service.runtime import OnnxModel


def open_faiss_index(
    settings: ServiceSettings, model: OnnxModel, folder: Path | None, **overrides: Any
) -> EmbeddingIndex:
    """The FAISS gallery of ``model`` in ``folder`` (None: in memory), with the settings' index type,
    HNSW parameters, compaction and read-only flag; ``overrides`` replace any of those."""
    options: dict[str, Any] = dict(
        index_type=settings.index_type,
        hnsw_m=settings.hnsw_m,
        hnsw_ef_construction=settings.hnsw_ef_construction,
        hnsw_ef_search=settings.hnsw_ef_search,
        compact_every=settings.index_compact_every,
        read_only=settings.index_read_only,
    )
    options.update(overrides)
    return EmbeddingIndex(folder, dim=model.spec.embed_dim, model_sha256=model.sha256, model_name=model.name, **options)


def open_milvus_gallery(settings: ServiceSettings, model: OnnxModel, **overrides: Any) -> Gallery:
    """The Milvus gallery of ``model`` at ``DINO_MILVUS_URI``; ``overrides`` replace settings."""
    try:
        import pymilvus  # noqa: F401  (only when asked for: the faiss default never loads it)
    except ImportError as exc:
        raise GalleryError(
            "DINO_GALLERY=milvus needs pymilvus (and milvus-lite for a .db path): pip install 'dino-platform[milvus]'"
        ) from exc
    from service.gallery.milvus_store import MilvusGallery

    assert settings.milvus_uri, "ServiceSettings refuses DINO_GALLERY=milvus without DINO_MILVUS_URI"
    token = settings.milvus_token.get_secret_value() if settings.milvus_token is not None else None
    options: dict[str, Any] = dict(
        collection=settings.milvus_collection,
        token=token,
        index_type=settings.milvus_index_type,
        index_params=settings.milvus_index_params,
        search_params=settings.milvus_search_params,
        hnsw_m=settings.hnsw_m,
        hnsw_ef_construction=settings.hnsw_ef_construction,
        hnsw_ef_search=settings.hnsw_ef_search,
        consistency=settings.milvus_consistency,
        timeout=settings.milvus_timeout,
        retry_interval=settings.milvus_retry_interval,
        read_only=settings.index_read_only,
    )
    options.update(overrides)
    return MilvusGallery(
        settings.milvus_uri, dim=model.spec.embed_dim, model_sha256=model.sha256, model_name=model.name, **options
    )


def open_gallery(settings: ServiceSettings, model: OnnxModel) -> Gallery:
    """The gallery the settings choose (``DINO_GALLERY``)."""
    if settings.gallery == "milvus":
        return open_milvus_gallery(settings, model)
    return open_faiss_index(settings, model, settings.index_dir)


def check_multi_process(settings: ServiceSettings) -> bool:
    """Before ``dino serve`` starts ``settings.workers`` processes: GalleryError when they cannot share
    the gallery; returns True when the gallery must be served read-only (FAISS with several workers)."""
    if settings.gallery == "milvus":
        uri = settings.milvus_uri or ""
        if settings.workers > 1 and uri and not is_server_uri(uri):
            raise GalleryError(
                f"Milvus Lite ({lite_path(uri)}) is opened by one process: with --workers {settings.workers} "
                "run a Milvus server and set DINO_MILVUS_URI=http://HOST:19530"
            )
        return False
    read_only = settings.workers > 1 or settings.index_read_only
    if read_only and settings.index_dir is not None:
        check_shared_reading(settings.index_dir)
    return settings.workers > 1
