"""The gallery interface every backend implements, its errors and its ids.

A gallery holds L2-normalised embeddings of one model, each with an id, an optional label, optional
JSON metadata and the stored image (the model's crop as JPEG). The HTTP routes only talk to
:class:`Gallery`, so every backend gives the same answers:

- ``add`` is answered once the entries are durable (FAISS: journal fsynced; Milvus: the server
  acknowledged the write) and returns their ids;
- ``search`` ranks by inner product of L2-normalised embeddings (= cosine similarity), best first;
- a missing id is :class:`UnknownImageError` (404), a write to a read-only gallery
  :class:`GalleryReadOnlyError` (409), a backend that cannot be reached right now
  :class:`GalleryUnavailableError` (503), an entry over a backend's size limits
  :class:`GalleryEntryTooLarge` (413).

Bulk loading of precomputed embeddings (``dino embed`` and the like) calls :meth:`Gallery.add` once
per batch: ``images`` may be None (no stored image), and ``ids`` may be given (32 lowercase hex
digits) so that re-running a job does not add the same images twice.
"""

from __future__ import annotations

import math
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np

_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def json_safe(value: Any) -> Any:
    """``value`` with what JSON cannot carry replaced: non-finite numbers by null, text that is not
    valid Unicode (lone surrogates) by U+FFFD. New gallery entries are refused at the door when they
    hold either; the FAISS store passes what it loads from disk through this, so that entries stored
    before that check cannot break later answers. Iterative: no recursion limit."""
    root: list[Any] = [value]
    stack: list[tuple[Any, Any]] = [(root, 0)]
    while stack:
        parent, key = stack.pop()
        item = parent[key]
        if isinstance(item, float) and not math.isfinite(item):
            parent[key] = None
        elif isinstance(item, str):
            # UTF-16 with surrogatepass round-trips valid text and turns a lone surrogate into U+FFFD
            parent[key] = item.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        elif isinstance(item, list):
            item = parent[key] = list(item)
            stack.extend((item, i) for i in range(len(item)))
        elif isinstance(item, dict):
            item = parent[key] = {json_safe(k): v for k, v in item.items()}
            stack.extend((item, k) for k in item)
    return root[0]


class GalleryError(Exception):
    """A gallery problem the operator must fix (unreadable folder, wrong model, folder in use)."""


class GalleryModelMismatch(GalleryError):
    """The stored gallery was built with another model: its embeddings are not comparable."""


class GalleryReadOnlyError(GalleryError):
    """A write to a gallery opened read-only."""


class GalleryUnavailableError(GalleryError):
    """The gallery's backend cannot be reached right now (HTTP 503); the service retries on its own."""


class GalleryEntryTooLarge(GalleryError):
    """A label, metadata or image larger than the backend can store (HTTP 413)."""


class UnknownImageError(KeyError):
    """No gallery image with this id."""


def new_image_id() -> str:
    """A fresh opaque id: 32 lowercase hex digits (uuid4)."""
    return uuid.uuid4().hex


def is_valid_image_id(image_id: object) -> TypeGuard[str]:
    """True for well-formed ids (the only strings ever joined to a path or put into a filter)."""
    return isinstance(image_id, str) and _ID_RE.fullmatch(image_id) is not None


@dataclass(frozen=True)
class Neighbor:
    """One search result."""

    id: str
    score: float
    label: str | None
    metadata: dict | None


@dataclass(frozen=True)
class GalleryHealth:
    """Whether the gallery can serve requests now, and if not, why (what /readyz reports)."""

    available: bool
    detail: str | None = None


@dataclass(frozen=True)
class NewEntries:
    """A validated batch for :meth:`Gallery.add`: arrays of equal length, ids chosen."""

    ids: list[str]
    embeddings: np.ndarray
    labels: list[str | None]
    metadata: list[dict | None]
    images: list[bytes] | None


def check_new_entries(
    dim: int,
    embeddings: np.ndarray,
    labels: Sequence[str | None] | None,
    metadata: Sequence[dict | None] | None,
    images: Sequence[bytes] | None,
    ids: Sequence[str] | None,
) -> NewEntries:
    """The arguments of :meth:`Gallery.add` checked (shapes, finite values, id format) and completed
    (missing labels/metadata as None, new ids); ValueError for a caller's mistake."""
    embeddings = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        raise ValueError(f"embeddings must be [n, {dim}], got {list(embeddings.shape)}")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or infinity")
    n = len(embeddings)
    label_list: list[str | None] = list(labels) if labels is not None else [None] * n
    metadata_list: list[dict | None] = list(metadata) if metadata is not None else [None] * n
    image_list = list(images) if images is not None else None
    if len(label_list) != n or len(metadata_list) != n or (image_list is not None and len(image_list) != n):
        raise ValueError("embeddings, labels, metadata and images must have the same length")
    if ids is None:
        id_list = [new_image_id() for _ in range(n)]
    else:
        id_list = list(ids)
        if len(id_list) != n:
            raise ValueError("embeddings and ids must have the same length")
        bad = [i for i in id_list if not is_valid_image_id(i)]
        if bad:
            raise ValueError(f"ids must be 32 lowercase hex digits, got {str(bad[0])[:40]!r}")
        if len(set(id_list)) != n:
            raise ValueError("ids must be unique")
    return NewEntries(id_list, embeddings, label_list, metadata_list, image_list)


class Gallery(ABC):
    """What the service needs from a gallery backend. Methods block (disk or network): the service
    calls them in its gallery thread pool, never on the event loop. All are thread-safe."""

    #: "faiss" or "milvus" (GET /index)
    backend: str
    dim: int
    read_only: bool

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of images, without I/O: exact for FAISS, the last count seen for Milvus (other
        processes may have changed it since; :meth:`info` counts)."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """What GET /index reports: size, dim, model, model_sha256, backend, index_type, persistent, read_only."""

    @abstractmethod
    def items(self, offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
        """(gallery size, the entries ``offset`` to ``offset + limit`` in the order they were added):
        id, label, metadata."""

    @abstractmethod
    def ids(self) -> list[str]:
        """Every id, in the order they were added."""

    @abstractmethod
    def entry(self, image_id: str) -> dict[str, Any]:
        """id, label and metadata of a gallery image; raises :class:`UnknownImageError`."""

    @abstractmethod
    def embedding(self, image_id: str) -> np.ndarray:
        """The stored (L2-normalised) embedding of a gallery image; raises :class:`UnknownImageError`."""

    @abstractmethod
    def read_image(self, image_id: str) -> bytes:
        """The stored JPEG of a gallery image; :class:`UnknownImageError` when there is none."""

    @abstractmethod
    def search(self, query: np.ndarray, k: int, exclude: str | None = None) -> list[Neighbor]:
        """The ``k`` gallery images most similar to ``query`` (inner product), best first, without ``exclude``."""

    @abstractmethod
    def add(
        self,
        embeddings: np.ndarray,
        labels: Sequence[str | None] | None = None,
        metadata: Sequence[dict | None] | None = None,
        images: Sequence[bytes] | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[str]:
        """Add L2-normalised embeddings [n, D] with per-image labels, metadata and JPEG bytes; returns
        the ids once the add is durable. ``ids`` (optional) must be new, well-formed and unique."""

    @abstractmethod
    def delete(self, image_id: str) -> None:
        """Remove an image (durable when this returns); raises :class:`UnknownImageError`."""

    def check_writable(self) -> None:
        """Raise unless a write may be tried now (no I/O: called before an upload is even read)."""
        if self.read_only:
            raise GalleryReadOnlyError("the gallery is read-only in this server")

    def health(self) -> GalleryHealth:
        """Whether the gallery can be used now, from what the last call saw (no I/O)."""
        return GalleryHealth(True)

    def probe(self) -> GalleryHealth:
        """Check the backend now (and reconnect when it was unreachable); the service's watchdog
        calls this every few seconds for galleries whose :attr:`needs_watchdog` is true."""
        return self.health()

    #: True when the backend is remote and can come and go (the service then probes it)
    needs_watchdog: bool = False

    def close(self) -> None:  # noqa: B027  (optional: nothing to release by default)
        """Release what the gallery holds (locks, connections); the stored gallery stays as it is."""
