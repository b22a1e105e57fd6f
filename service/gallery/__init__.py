"""The gallery behind one interface (:class:`Gallery`), with two backends:

- ``faiss_store``    the FAISS index folder (default): embedded, crash-safe journal, snapshots, one writer
- ``milvus_store``   a Milvus collection (Milvus Lite in-process, or a Milvus server shared by many processes)
- ``milvus_schema``  the collection's fields, limits, names and index parameters
- ``base``           the interface, its errors and ids
- ``factory``        open the backend the settings choose; the multi-process checks of ``dino serve``
"""

from service.gallery.base import (
    Gallery,
    GalleryEntryTooLarge,
    GalleryError,
    GalleryHealth,
    GalleryModelMismatch,
    GalleryReadOnlyError,
    GalleryUnavailableError,
    Neighbor,
    UnknownImageError,
    is_valid_image_id,
    new_image_id,
)
from service.gallery.faiss_store import MANIFEST_FILE, EmbeddingIndex, check_shared_reading

__all__ = [
    "MANIFEST_FILE",
    "EmbeddingIndex",
    "Gallery",
    "GalleryEntryTooLarge",
    "GalleryError",
    "GalleryHealth",
    "GalleryModelMismatch",
    "GalleryReadOnlyError",
    "GalleryUnavailableError",
    "Neighbor",
    "UnknownImageError",
    "check_shared_reading",
    "is_valid_image_id",
    "new_image_id",
]
