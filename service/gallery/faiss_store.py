"""The FAISS gallery (the default backend): an index folder on local disk, embedded in the service,
nothing to start. L2-normalised embeddings in FAISS, with ids, labels, metadata and images, made durable.

Search is by inner product on L2-normalised embeddings (= cosine similarity): exact with
``IndexFlatIP`` (the default), approximate with ``IndexHNSWFlat`` for large galleries.

On-disk layout of an index folder (``index_dir``)::

    index.json               manifest: model sha256/name, dim, index type, current snapshot + journal
    snapshot-000007/         embeddings.npy [n, D] float32, entries.jsonl (id, label, metadata per row),
                             faiss.index (HNSW only: saves rebuilding the graph at load)
    journal-000007.log       append-only log of acknowledged adds/deletes since that snapshot
    images/<id>.jpg          the model's view (centre crop) of every gallery image
    .lock                    flock()ed by the one process that may write

Durability ("a crash at any moment leaves a loadable index holding every acknowledged add"):

- an add first writes the images (temporary file, fsync, rename, fsync of the folder), then appends
  one line per image to the journal and fsyncs it; only then is the request answered. A journal
  line carries a CRC32, so a line torn by a crash is recognised; it was never acknowledged and is
  cut off at the next load (before anything is appended after it);
- every ``compact_every`` journal entries the gallery is compacted: a new snapshot folder and an
  empty journal are written under new names and fsynced, then the manifest is replaced atomically
  (write ``index.json.tmp``, fsync, rename, fsync the folder). That rename is the commit point:
  before it the old snapshot + journal are complete, after it the new ones are. Old files are
  removed afterwards, and leftovers of an interrupted compaction are removed at the next load;
- a delete is journalled (and fsynced) before its image file is removed; image files of ids that
  are not in the gallery (a crash between writing images and the journal) are removed at load.

Ids are ``uuid4().hex`` (32 lowercase hex digits) made by the server (or given by a bulk loader in the
same form); anything else is refused before it can reach a file path.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import threading
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from service.durable import fsync_dir, write_file_durably
from service.gallery.base import (
    Gallery,
    GalleryError,
    GalleryModelMismatch,
    Neighbor,
    UnknownImageError,
    check_new_entries,
    is_valid_image_id,
    json_safe,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "index.json"
IMAGES_DIR = "images"
LOCK_FILE = ".lock"
EMBEDDINGS_FILE = "embeddings.npy"
ENTRIES_FILE = "entries.jsonl"
FAISS_FILE = "faiss.index"
IMAGE_SUFFIX = ".jpg"
INDEX_TYPES = ("flat", "hnsw")
_SNAPSHOT_RE = re.compile(r"^snapshot-(\d{6,})$")
_JOURNAL_RE = re.compile(r"^journal-(\d{6,})\.log$")
#: names this module may leave in an index folder (anything else makes a manifest-less folder "foreign")
_OWN_NAME_RE = re.compile(r"^(snapshot-\d{6,}|journal-\d{6,}\.log|images|\.lock|index\.json|\..+\.tmp)$")


# --------------------------------------------------------------------------------------------------
# Small durable-file helpers
# --------------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _encode_journal_line(record: dict) -> bytes:
    payload = json.dumps(record, separators=(",", ":"), ensure_ascii=True).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _decode_journal_line(line: bytes) -> dict | None:
    """The record of a journal line, or None when the line is torn/corrupt (bad CRC or JSON)."""
    try:
        crc, payload = line.split(b" ", 1)
        if int(crc, 16) != zlib.crc32(payload):
            return None
        record = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _decode_vector(text: str, dim: int) -> np.ndarray:
    vector = np.frombuffer(base64.b64decode(text), dtype="<f4")
    if vector.shape != (dim,):
        raise ValueError(f"embedding of {vector.size} values, expected {dim}")
    return vector.astype(np.float32)


class _FolderLock:
    """Advisory lock of an index folder (flock; released by the OS if the process dies).

    The one writer holds it exclusively; read-only servers (``--workers N``) share it. So a reader
    never attaches to a folder that a live writer is changing (it would serve a snapshot that never
    refreshes), and a writer never starts under live readers.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, shared: bool = False) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no inter-process protection
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if shared:
                raise GalleryError(
                    f"index folder {self.path.parent} is being written by another process (lock {self.path}); "
                    "a read-only server would serve a snapshot that never refreshes: stop the writer first"
                ) from exc
            raise GalleryError(
                f"index folder {self.path.parent} is in use by another process (lock {self.path}); "
                "one server (with one worker) writes a gallery at a time"
            ) from exc
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_shared_reading(path: Path) -> None:
    """Raise :class:`GalleryError` unless read-only servers can share the gallery folder ``path`` now:
    it must hold a gallery, and no live process may be writing it. ``dino serve --workers N`` asks
    before it starts the workers, so that the answer is one clear message, not N failed workers."""
    if not (path / MANIFEST_FILE).is_file():
        raise GalleryError(
            f"no gallery index in {path}: several workers serve a gallery read-only and cannot create one; "
            "build it with 'dino index build', or start one worker to create it"
        )
    lock = _FolderLock(path / LOCK_FILE)
    lock.acquire(shared=True)
    lock.release()


# --------------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------------


class EmbeddingIndex(Gallery):
    """A FAISS gallery of L2-normalised embeddings with ids, labels, metadata and images.

    ``path=None`` keeps everything in memory (lost at exit). Otherwise the folder is created if
    missing (or loaded), checked against ``model_sha256`` and locked for writing unless
    ``read_only``. All methods are thread-safe (one lock; FAISS searches are fast next to inference).

    One process writes an index folder (``flock``); ``dino serve --workers N`` shares it read-only.

    Args:
        path: index folder, or None for an in-memory gallery.
        dim: embedding dimension of the model.
        model_sha256, model_name: identity of the model whose embeddings are stored.
        index_type: "flat" (exact) or "hnsw" (approximate); an existing folder of the other type is
            converted (the FAISS index is rebuilt from the stored embeddings).
        hnsw_m, hnsw_ef_construction, hnsw_ef_search: HNSW parameters.
        compact_every: journal entries after which a new snapshot is written.
        read_only: load without locking; every write raises :class:`GalleryReadOnlyError`.
    """

    backend = "faiss"

    def __init__(
        self,
        path: str | os.PathLike | None,
        *,
        dim: int,
        model_sha256: str,
        model_name: str = "",
        index_type: str = "flat",
        hnsw_m: int = 32,
        hnsw_ef_construction: int = 200,
        hnsw_ef_search: int = 128,
        compact_every: int = 1000,
        read_only: bool = False,
    ):
        if index_type not in INDEX_TYPES:
            raise GalleryError(f"unknown index type {index_type!r}; choose one of {INDEX_TYPES}")
        self.path = Path(path) if path is not None else None
        self.dim = int(dim)
        self.model_sha256 = model_sha256
        self.model_name = model_name
        self.index_type = index_type
        self.hnsw_m = hnsw_m
        self.hnsw_ef_construction = hnsw_ef_construction
        self.hnsw_ef_search = hnsw_ef_search
        self.compact_every = compact_every
        self.read_only = read_only
        self._lock = threading.RLock()
        self._folder_lock: _FolderLock | None = None
        # row r of the FAISS index <-> _ids[r], _labels[r], _metadata[r]; deleted rows stay until compaction
        self._ids: list[str] = []
        self._labels: list[str | None] = []
        self._metadata: list[dict | None] = []
        self._alive: list[bool] = []
        self._row: dict[str, int] = {}  # live id -> row
        self._memory_images: dict[str, bytes] = {}  # images of an in-memory gallery
        self._faiss: Any = self._new_faiss()  # faiss's bundled stubs miss much of its API
        self._generation = 0
        self._journal_fd: int | None = None
        self._journal_entries = 0
        if self.path is not None:
            self._open_folder()

    # ------------------------------------------------------------------ properties

    @property
    def size(self) -> int:
        """Number of images in the gallery."""
        return len(self._row)

    @property
    def persistent(self) -> bool:
        return self.path is not None

    def info(self) -> dict[str, Any]:
        """What GET /index reports."""
        with self._lock:
            return {
                "size": self.size,
                "dim": self.dim,
                "model": self.model_name,
                "model_sha256": self.model_sha256,
                "backend": self.backend,
                "index_type": self.index_type,
                "persistent": self.persistent,
                "read_only": self.read_only,
            }

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and image_id in self._row

    def items(self, offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
        """(gallery size, the entries ``offset`` to ``offset + limit`` in insertion order): id, label, metadata."""
        with self._lock:
            rows = [row for row, alive in enumerate(self._alive) if alive]
            page = rows[offset : offset + limit]
            entries = [{"id": self._ids[r], "label": self._labels[r], "metadata": self._metadata[r]} for r in page]
            return len(rows), entries

    def ids(self) -> list[str]:
        """The ids in the gallery, in insertion order."""
        with self._lock:
            return [i for i, alive in zip(self._ids, self._alive, strict=True) if alive]

    # ------------------------------------------------------------------ FAISS

    def _new_faiss(self, index_type: str | None = None) -> faiss.Index:
        if (index_type or self.index_type) == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.hnsw_ef_construction
            index.hnsw.efSearch = self.hnsw_ef_search
            return index
        return faiss.IndexFlatIP(self.dim)

    def _all_vectors(self) -> np.ndarray:
        n = self._faiss.ntotal
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._faiss.reconstruct_n(0, n)

    # ------------------------------------------------------------------ reads

    def entry(self, image_id: str) -> dict[str, Any]:
        """id, label and metadata of a gallery image; raises :class:`UnknownImageError`."""
        with self._lock:
            row = self._row_of(image_id)
            return {"id": image_id, "label": self._labels[row], "metadata": self._metadata[row]}

    def embedding(self, image_id: str) -> np.ndarray:
        """The stored (L2-normalised) embedding of a gallery image."""
        with self._lock:
            return self._faiss.reconstruct(self._row_of(image_id))

    def read_image(self, image_id: str) -> bytes:
        """The stored JPEG of a gallery image (the model's centre crop)."""
        with self._lock:
            self._row_of(image_id)
            if self.path is None:
                return self._memory_images[image_id]
        try:
            return self._image_path(image_id).read_bytes()
        except FileNotFoundError as exc:  # deleted between the check and the read
            raise UnknownImageError(image_id) from exc

    def search(self, query: np.ndarray, k: int, exclude: str | None = None) -> list[Neighbor]:
        """The ``k`` gallery images most similar to ``query`` (inner product), best first."""
        query = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(1, self.dim))
        with self._lock:
            total = self._faiss.ntotal
            if total == 0 or not self._row:
                return []
            dead = total - len(self._row)
            fetch = min(total, k + dead + (1 if exclude else 0))
            if self.index_type == "hnsw":
                params = faiss.SearchParametersHNSW(efSearch=max(self.hnsw_ef_search, fetch))  # type: ignore[attr-defined]  # not in faiss's stubs
                scores, rows = self._faiss.search(query, fetch, params=params)
            else:
                scores, rows = self._faiss.search(query, fetch)
            results = []
            for score, row in zip(scores[0], rows[0], strict=True):
                if row < 0 or not self._alive[row] or self._ids[row] == exclude:
                    continue
                results.append(Neighbor(self._ids[row], float(score), self._labels[row], self._metadata[row]))
                if len(results) == k:
                    break
            return results

    def _row_of(self, image_id: str) -> int:
        if not is_valid_image_id(image_id) or image_id not in self._row:
            raise UnknownImageError(image_id)
        return self._row[image_id]

    def _image_path(self, image_id: str) -> Path:
        assert self.path is not None and is_valid_image_id(image_id)  # never a client string unchecked
        return self.path / IMAGES_DIR / f"{image_id}{IMAGE_SUFFIX}"

    # ------------------------------------------------------------------ writes

    def _refuse_taken_ids(self, new_ids: Sequence[str]) -> None:
        with self._lock:
            taken = [i for i in new_ids if i in self._row]
        if taken:
            raise ValueError(f"id {taken[0]} is already in the gallery")

    def add(
        self,
        embeddings: np.ndarray,
        labels: Sequence[str | None] | None = None,
        metadata: Sequence[dict | None] | None = None,
        images: Sequence[bytes] | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[str]:
        """Add L2-normalised embeddings [n, D] (with per-image labels, metadata, JPEG bytes).

        Returns the new ids once the add is durable (journal fsynced). Given ``ids`` must not be in
        the gallery yet (ValueError).
        """
        self.check_writable()
        batch = check_new_entries(self.dim, embeddings, labels, metadata, images, ids)
        n = len(batch.ids)
        if n == 0:
            return batch.ids
        if ids is not None:
            self._refuse_taken_ids(batch.ids)  # early, before any image is written
        if self.path is not None and batch.images is not None:
            # images first: a journal entry must never point at a missing image
            images_dir = self.path / IMAGES_DIR
            for image_id, data in zip(batch.ids, batch.images, strict=True):
                write_file_durably(self._image_path(image_id), data, sync_dir=False)
            fsync_dir(images_dir)
        with self._lock:
            self.check_writable()
            if ids is not None:
                self._refuse_taken_ids(batch.ids)  # again under the write lock: a concurrent add may have taken them
            if self.path is not None:
                lines = b"".join(
                    _encode_journal_line(
                        {"op": "add", "id": i, "label": label, "metadata": meta, "embedding": _encode_vector(vector)}
                    )
                    for i, label, meta, vector in zip(
                        batch.ids, batch.labels, batch.metadata, batch.embeddings, strict=True
                    )
                )
                self._append_journal(lines, n)
            elif batch.images is not None:
                self._memory_images.update(zip(batch.ids, batch.images, strict=True))
            self._apply_add(batch.ids, batch.labels, batch.metadata, batch.embeddings)
            self._maybe_compact()
        return batch.ids

    def delete(self, image_id: str) -> None:
        """Remove an image (durable when this returns); raises :class:`UnknownImageError`."""
        self.check_writable()
        with self._lock:
            self._row_of(image_id)
            if self.path is not None:
                self._append_journal(_encode_journal_line({"op": "delete", "id": image_id}), 1)
            self._apply_delete(image_id)
            self._memory_images.pop(image_id, None)
            self._maybe_compact()
        if self.path is not None:
            self._image_path(image_id).unlink(missing_ok=True)  # a leftover is removed at the next load

    def _apply_add(self, ids, labels, metadata, embeddings: np.ndarray) -> None:
        start = self._faiss.ntotal
        self._faiss.add(embeddings)
        for offset, (image_id, label, meta) in enumerate(zip(ids, labels, metadata, strict=True)):
            self._ids.append(image_id)
            self._labels.append(label)
            self._metadata.append(meta)
            self._alive.append(True)
            self._row[image_id] = start + offset

    def _apply_delete(self, image_id: str) -> None:
        row = self._row.pop(image_id, None)
        if row is not None:
            self._alive[row] = False

    def _append_journal(self, data: bytes, entries: int) -> None:
        assert self._journal_fd is not None
        fd = self._journal_fd
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            # e.g. disk full: remove the partial lines, or the next acknowledged record would be glued
            # to them and fail its CRC at the next load
            try:
                os.ftruncate(fd, start)
                os.fsync(fd)
            except OSError:
                log.exception("could not roll back a failed journal write")
            raise
        self._journal_entries += entries

    # ------------------------------------------------------------------ folder: open, load, compact

    def _journal_path(self, generation: int) -> Path:
        assert self.path is not None
        return self.path / f"journal-{generation:06d}.log"

    def _snapshot_path(self, generation: int) -> Path:
        assert self.path is not None
        return self.path / f"snapshot-{generation:06d}"

    def _open_folder(self) -> None:
        assert self.path is not None
        manifest_path = self.path / MANIFEST_FILE
        if not manifest_path.is_file():
            if self.read_only:
                raise GalleryError(
                    f"no gallery index in {self.path}: a read-only server (--workers > 1) cannot create one; "
                    "build it with 'dino index build', or start one worker to create it"
                )
            self._create_folder()
            return
        self._folder_lock = _FolderLock(self.path / LOCK_FILE)
        self._folder_lock.acquire(shared=self.read_only)
        try:
            self._load(manifest_path)
        except BaseException:
            self.close()
            raise

    def _create_folder(self) -> None:
        assert self.path is not None
        if self.path.exists() and not self.path.is_dir():
            raise GalleryError(f"index path {self.path} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        foreign = sorted(p.name for p in self.path.iterdir() if not _OWN_NAME_RE.match(p.name))
        if foreign:
            raise GalleryError(
                f"refusing to create a gallery index in {self.path}: the folder is not empty and holds no "
                f"{MANIFEST_FILE} (found {', '.join(foreign[:5])}); use an empty or new folder"
            )
        self._folder_lock = _FolderLock(self.path / LOCK_FILE)
        self._folder_lock.acquire()
        # leftovers of a creation that crashed before its manifest was written
        for leftover in self.path.iterdir():
            if leftover.name != LOCK_FILE:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        (self.path / IMAGES_DIR).mkdir()
        fsync_dir(self.path)
        self._write_generation(0)
        self._open_journal(0)
        log.info(
            "created gallery index %s (%s, dim %d, model %s)", self.path, self.index_type, self.dim, self.model_name
        )

    def _load(self, manifest_path: Path) -> None:
        assert self.path is not None
        try:
            manifest = json.loads(manifest_path.read_text())
            generation = int(manifest["generation"])
            stored_sha = str(manifest["model_sha256"])
            stored_dim = int(manifest["dim"])
            stored_type = str(manifest["index_type"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GalleryError(f"{manifest_path}: unreadable gallery manifest: {exc}") from exc
        if manifest.get("format_version") != FORMAT_VERSION:
            raise GalleryError(f"{manifest_path}: unsupported format_version {manifest.get('format_version')!r}")
        if stored_sha != self.model_sha256:
            raise GalleryModelMismatch(
                f"the gallery index {self.path} was built with model {manifest.get('model_name')!r} "
                f"(sha256 {stored_sha}), but the served model is {self.model_name!r} (sha256 {self.model_sha256}); "
                "its embeddings are not comparable: serve that model, or rebuild the gallery with 'dino index build'"
            )
        if stored_dim != self.dim:
            raise GalleryError(f"{manifest_path}: dimension {stored_dim} does not match the model's {self.dim}")

        snapshot = self._snapshot_path(generation)
        vectors, entries = self._read_snapshot(snapshot)
        loaded_faiss: Any = None
        if stored_type == self.index_type == "hnsw" and (snapshot / FAISS_FILE).is_file():
            loaded_faiss = faiss.read_index(str(snapshot / FAISS_FILE))
            if loaded_faiss.ntotal != len(vectors) or loaded_faiss.d != self.dim:
                loaded_faiss = None  # inconsistent: rebuild from the embeddings
        if loaded_faiss is not None:
            loaded_faiss.hnsw.efSearch = self.hnsw_ef_search
            self._faiss = loaded_faiss
        else:
            self._faiss = self._new_faiss()
            if len(vectors):
                self._faiss.add(vectors)
        for row, entry in enumerate(entries):
            self._ids.append(entry["id"])
            self._labels.append(json_safe(entry.get("label")))
            self._metadata.append(json_safe(entry.get("metadata")))
            self._alive.append(True)
            self._row[entry["id"]] = row
        self._generation = generation
        replayed = self._replay_journal(self._journal_path(generation))
        log.info(
            "loaded gallery index %s: %d images (snapshot %d + %d journal entries), %s",
            self.path,
            self.size,
            len(entries),
            replayed,
            stored_type,
        )
        if not self.read_only:
            self._remove_leftovers()
            self._open_journal(generation)
            if stored_type != self.index_type or self._journal_entries >= self.compact_every:
                if stored_type != self.index_type:
                    log.info("converting gallery index %s from %s to %s", self.path, stored_type, self.index_type)
                self.compact()

    def _read_snapshot(self, snapshot: Path) -> tuple[np.ndarray, list[dict]]:
        try:
            vectors = np.load(snapshot / EMBEDDINGS_FILE, allow_pickle=False)
            lines = (snapshot / ENTRIES_FILE).read_text().splitlines()
            entries = [json.loads(line) for line in lines if line.strip()]
        except (OSError, ValueError) as exc:
            raise GalleryError(f"{snapshot}: unreadable gallery snapshot: {exc}") from exc
        if vectors.ndim != 2 or vectors.shape != (len(entries), self.dim) or vectors.dtype != np.float32:
            raise GalleryError(
                f"{snapshot}: embeddings {vectors.shape} do not match {len(entries)} entries of dim {self.dim}"
            )
        for entry in entries:
            if not isinstance(entry, dict) or not is_valid_image_id(entry.get("id")):
                raise GalleryError(f"{snapshot}: invalid entry {str(entry)[:100]}")
        return np.ascontiguousarray(vectors), entries

    def _replay_journal(self, journal: Path) -> int:
        """Apply the journal's records; cut off a torn tail (writable mode). Returns the records applied."""
        try:
            data = journal.read_bytes()
        except FileNotFoundError:
            data = b""
        applied = skipped = 0
        valid_end = 0
        position = 0
        for line in data.splitlines(keepends=True):
            position += len(line)
            record = _decode_journal_line(line.rstrip(b"\n")) if line.endswith(b"\n") else None
            if record is None or not self._apply_record(record):
                skipped += 1
                continue
            applied += 1
            valid_end = position
        if valid_end < len(data):
            tail = len(data) - valid_end
            log.warning("gallery journal %s: ignoring %d bytes after the last valid record (torn write)", journal, tail)
            if not self.read_only:
                with open(journal, "rb+") as f:
                    f.truncate(valid_end)
                    f.flush()
                    os.fsync(f.fileno())
        if skipped and valid_end == len(data):
            log.error("gallery journal %s: skipped %d corrupt records inside the journal", journal, skipped)
        self._journal_entries = applied
        return applied

    def _apply_record(self, record: dict) -> bool:
        image_id = record.get("id")
        if not is_valid_image_id(image_id):
            return False
        if record.get("op") == "add":
            try:
                vector = _decode_vector(record["embedding"], self.dim)
            except (KeyError, ValueError, TypeError):
                return False
            if image_id not in self._row:
                label, meta = json_safe(record.get("label")), json_safe(record.get("metadata"))
                self._apply_add([image_id], [label], [meta], vector[None])
            return True
        if record.get("op") == "delete":
            self._apply_delete(image_id)
            return True
        return False

    def _remove_leftovers(self) -> None:
        """Remove what crashes leave behind: files of other generations, temporaries, orphan images."""
        assert self.path is not None
        for item in self.path.iterdir():
            name = item.name
            match = _SNAPSHOT_RE.match(name) or _JOURNAL_RE.match(name)
            stale = (match is not None and int(match.group(1)) != self._generation) or name.endswith(".tmp")
            if stale:
                shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
        images_dir = self.path / IMAGES_DIR
        images_dir.mkdir(exist_ok=True)
        for item in images_dir.iterdir():
            image_id = item.name[: -len(IMAGE_SUFFIX)] if item.name.endswith(IMAGE_SUFFIX) else None
            if image_id is None or image_id not in self._row:
                item.unlink(missing_ok=True)

    def _open_journal(self, generation: int) -> None:
        fd = os.open(self._journal_path(generation), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        previous, self._journal_fd = self._journal_fd, fd
        if previous is not None:
            os.close(previous)

    def _write_generation(self, generation: int) -> None:
        """Write the snapshot + empty journal of ``generation`` and commit them through the manifest."""
        assert self.path is not None
        snapshot = self._snapshot_path(generation)
        tmp = snapshot.with_name(f".{snapshot.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        live = [row for row, alive in enumerate(self._alive) if alive]
        vectors = self._all_vectors()[live] if live else np.zeros((0, self.dim), dtype=np.float32)
        with open(tmp / EMBEDDINGS_FILE, "wb") as f:
            np.save(f, np.ascontiguousarray(vectors, dtype=np.float32))
            f.flush()
            os.fsync(f.fileno())
        entries = "".join(
            json.dumps({"id": self._ids[row], "label": self._labels[row], "metadata": self._metadata[row]}) + "\n"
            for row in live
        )
        with open(tmp / ENTRIES_FILE, "w") as f:
            f.write(entries)
            f.flush()
            os.fsync(f.fileno())
        compacted = self._faiss if len(live) == self._faiss.ntotal and self._faiss_type_matches() else None
        if compacted is None:
            compacted = self._new_faiss()
            if len(vectors):
                compacted.add(vectors)
        if self.index_type == "hnsw":
            faiss.write_index(compacted, str(tmp / FAISS_FILE))
            _fsync_file(tmp / FAISS_FILE)
        fsync_dir(tmp)
        shutil.rmtree(snapshot, ignore_errors=True)  # a leftover of an interrupted compaction
        os.replace(tmp, snapshot)
        journal = self._journal_path(generation)
        with open(journal, "wb") as f:
            os.fsync(f.fileno())
        fsync_dir(self.path)
        manifest = {
            "format_version": FORMAT_VERSION,
            "model_sha256": self.model_sha256,
            "model_name": self.model_name,
            "dim": self.dim,
            "index_type": self.index_type,
            "hnsw_m": self.hnsw_m if self.index_type == "hnsw" else None,
            "generation": generation,
            "size": len(live),
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        # the commit point: from this rename on, the new snapshot and empty journal are the gallery
        write_file_durably(self.path / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
        # the in-memory state now mirrors the snapshot (rows renumbered without the deleted ones)
        self._faiss = compacted
        self._ids = [self._ids[row] for row in live]
        self._labels = [self._labels[row] for row in live]
        self._metadata = [self._metadata[row] for row in live]
        self._alive = [True] * len(live)
        self._row = {image_id: row for row, image_id in enumerate(self._ids)}
        self._generation = generation
        self._journal_entries = 0

    def _faiss_type_matches(self) -> bool:
        is_hnsw = isinstance(self._faiss, faiss.IndexHNSWFlat)
        return is_hnsw == (self.index_type == "hnsw")

    def compact(self) -> None:
        """Write a new snapshot with an empty journal (drops deleted rows); no-op in memory/read-only."""
        if self.path is None or self.read_only:
            return
        with self._lock:
            previous = self._generation
            self._write_generation(previous + 1)
            self._open_journal(self._generation)
            for old in (self._snapshot_path(previous), self._journal_path(previous)):
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
            log.info("gallery index %s compacted: %d images (generation %d)", self.path, self.size, self._generation)

    def _maybe_compact(self) -> None:
        if self.path is None or self._journal_entries < self.compact_every:
            return
        try:
            self.compact()
        except OSError:
            # the journal still holds everything acknowledged: keep serving and retry at the next write
            log.exception("gallery compaction failed; will retry")

    def close(self) -> None:
        """Close the journal and release the folder lock (the gallery stays loadable as is)."""
        with self._lock:
            if self._journal_fd is not None:
                os.close(self._journal_fd)
                self._journal_fd = None
            if self._folder_lock is not None:
                self._folder_lock.release()
                self._folder_lock = None
