"""The Milvus gallery: one collection shared by every service process, through pymilvus' MilvusClient.

``uri`` chooses where Milvus runs:

- a path ending in ``.db`` (``gallery/milvus.db``): Milvus Lite inside this process (pymilvus starts
  it). Like the FAISS folder, one process opens it (Milvus Lite locks its folder);
- ``http://host:19530``: a Milvus server (standalone or cluster) that any number of service
  processes and machines share; all of them add, delete and search.

Consistency: reads (search, get, query) use the collection's consistency level, Strong by default
(``DINO_MILVUS_CONSISTENCY``): Milvus then answers only once its query nodes have applied every
write acknowledged before the read began, so an add acknowledged by one replica is found by a search
on any other right away. Bounded (Milvus's own default) would let a search miss it for up to a few
seconds, and Session only covers the writes of the same client. Writes are upserts: an insert that
pymilvus retries after a lost answer cannot store a row twice.

Availability: every call has a deadline (``DINO_MILVUS_TIMEOUT``). When Milvus cannot be reached the
gallery raises :class:`GalleryUnavailableError` (HTTP 503 with the reason), remembers it, and answers
at once with the same error until the next attempt (``DINO_MILVUS_RETRY_INTERVAL``). The service's
watchdog calls :meth:`MilvusGallery.probe` at that interval, so the gallery comes back on its own
(collection checked, loaded again after a restart) as soon as Milvus does, with or without traffic.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from service.gallery import milvus_schema as schema
from service.gallery.base import (
    Gallery,
    GalleryError,
    GalleryHealth,
    GalleryModelMismatch,
    GalleryUnavailableError,
    Neighbor,
    UnknownImageError,
    check_new_entries,
    is_valid_image_id,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: rows per page when the listing reads every (id, added_at)
LIST_BATCH_ROWS = 1000
#: bytes of one insert request, at most (Milvus's gRPC limit is 64 MiB and more; smaller requests fail less)
MAX_REQUEST_BYTES = 16 * 1024 * 1024
#: Milvus's status code for "collection not loaded" (a restarted Milvus Lite brings collections back released)
NOT_LOADED_CODE = 101
#: characters of a Milvus error kept in the 503 detail
REASON_CHARS = 300
#: pymilvus logs every failed call with its traceback at ERROR; the gallery reports failures itself
#: (one warning per change of state, and the 503's detail), so only pymilvus' critical messages pass
PYMILVUS_LOG_LEVEL = logging.CRITICAL
#: the fields returned with search results and entries (never the image or the vector unless asked)
ENTRY_FIELDS = ["label", "metadata"]


def _quiet_pymilvus() -> None:
    """Lower pymilvus' logging to critical messages (it configures its logger when first imported,
    hence the import before)."""
    import pymilvus  # noqa: F401

    logging.getLogger("pymilvus").setLevel(PYMILVUS_LOG_LEVEL)


def _milvus_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "Milvus did not do it" (server down, timeout, server-side failure)."""
    import grpc
    from pymilvus.exceptions import MilvusException

    return MilvusException, grpc.RpcError, OSError


def _is_client_bug(exc: BaseException) -> bool:
    """pymilvus refused the call's arguments before sending anything: a bug here, not an outage."""
    from pymilvus.exceptions import DataTypeNotMatchException, ParamError

    return isinstance(exc, ParamError | DataTypeNotMatchException)


def _reason(exc: BaseException) -> str:
    """A one-line reason for a failed Milvus call."""
    message = getattr(exc, "message", None)
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if message is None and callable(code) and callable(details):  # grpc.RpcError
        with contextlib.suppress(Exception):
            message = f"{code()}: {details()}"
    text = " ".join(str(message or exc or type(exc).__name__).split())
    return text[:REASON_CHARS]


class MilvusGallery(Gallery):
    """A gallery in a Milvus collection (see the module docstring).

    Args:
        uri: Milvus server URI, or the path of a Milvus Lite database (``*.db``).
        dim, model_sha256, model_name: the served model; a collection of another model is refused.
        collection: collection name; default ``dino_<model name>_<dim>``.
        token: Milvus credentials (``user:password`` or an API key), if the server wants them.
        index_type, index_params, search_params: the vector index (HNSW, FLAT, IVF_FLAT, AUTOINDEX),
            its build parameters and search parameters (defaults: :mod:`milvus_schema`).
        hnsw_m, hnsw_ef_construction, hnsw_ef_search: HNSW defaults shared with the FAISS store.
        consistency: consistency level of reads (Strong, Bounded, Session, Eventually).
        timeout: seconds a Milvus call may take.
        retry_interval: seconds between reconnection attempts while Milvus is unreachable.
        read_only: refuse adds and deletes.
    """

    backend = "milvus"

    def __init__(
        self,
        uri: str,
        *,
        dim: int,
        model_sha256: str,
        model_name: str = "",
        collection: str | None = None,
        token: str | None = None,
        index_type: str = "HNSW",
        index_params: dict[str, Any] | None = None,
        search_params: dict[str, Any] | None = None,
        hnsw_m: int = 32,
        hnsw_ef_construction: int = 200,
        hnsw_ef_search: int = 128,
        consistency: str = "Strong",
        timeout: float = 10.0,
        retry_interval: float = 2.0,
        read_only: bool = False,
    ):
        if index_type not in schema.DEFAULT_INDEX_PARAMS:
            raise GalleryError(
                f"unknown Milvus index type {index_type!r}; choose one of {list(schema.DEFAULT_INDEX_PARAMS)}"
            )
        self.uri = uri
        self.embedded = not schema.is_server_uri(uri)
        self.lite_path: Path | None = schema.lite_path(uri) if self.embedded else None
        self.dim = int(dim)
        self.model_sha256 = model_sha256
        self.model_name = model_name
        self.collection = schema.check_collection_name(collection or schema.default_collection_name(model_name, dim))
        self.index_type = index_type
        self.index_params = schema.index_params(index_type, index_params, hnsw_m, hnsw_ef_construction)
        self.search_overrides = search_params
        self.hnsw_ef_search = hnsw_ef_search
        self.consistency = consistency
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.read_only = read_only
        # an embedded Milvus Lite lives and dies with this process: nothing to watch
        self.needs_watchdog = not self.embedded
        self._token = token or ""
        self._client: Any = None
        self._state_lock = threading.Lock()  # guards the fields below
        self._connect_lock = threading.Lock()  # one connection attempt at a time
        self._available = False
        self._reason = "not connected yet"
        self._next_attempt = 0.0
        self._size = 0
        _quiet_pymilvus()
        try:
            self._connect()
        except GalleryUnavailableError as exc:
            if self.embedded:  # nothing will bring a local database back: say so now
                self.close()
                raise GalleryError(str(exc)) from exc
            log.warning("%s; the gallery routes answer 503 until it is back", exc)
        except GalleryError:  # wrong model, foreign collection, database in use: the operator must act
            self.close()
            raise

    # ------------------------------------------------------------------ state

    @property
    def where(self) -> str:
        """Where the gallery is, for messages (no credentials)."""
        place = f"Milvus Lite {self.lite_path}" if self.embedded else f"Milvus at {schema.public_uri(self.uri)}"
        return f"{place}, collection {self.collection}"

    @property
    def size(self) -> int:
        return self._size

    def health(self) -> GalleryHealth:
        with self._state_lock:
            return GalleryHealth(self._available, None if self._available else self._unavailable_detail())

    def _unavailable_detail(self) -> str:
        return f"the gallery ({self.where}) is unavailable: {self._reason}"

    def _mark_unavailable(self, reason: str) -> None:
        with self._state_lock:
            changed = self._available or reason != self._reason
            self._available = False
            self._reason = reason
            self._next_attempt = time.monotonic() + self.retry_interval
        if changed:
            log.warning("the gallery (%s) is unavailable: %s", self.where, reason)

    def _mark_available(self, size: int) -> None:
        with self._state_lock:
            was = self._available
            self._available, self._reason, self._size = True, "", size
        if not was:
            log.info(
                "gallery %s available: %d images, %s index, %s consistency",
                self.where,
                size,
                self.index_type,
                self.consistency,
            )

    def _unavailable(self) -> GalleryUnavailableError:
        with self._state_lock:
            return GalleryUnavailableError(self._unavailable_detail())

    def check_writable(self) -> None:
        super().check_writable()
        with self._state_lock:
            down = not self._available and time.monotonic() < self._next_attempt
        if down:  # known to be down: refuse before the upload is read and the images embedded
            raise self._unavailable()

    # ------------------------------------------------------------------ connection

    def _new_client(self) -> Any:
        from pymilvus import MilvusClient

        uri = self.uri
        if self.lite_path is not None:
            self.lite_path.parent.mkdir(parents=True, exist_ok=True)
            self._check_lite_lock(self.lite_path)
            uri = str(self.lite_path)
            # the in-process Milvus Lite server leaves some RPCs unimplemented that pymilvus tries
            # and does without (AllocTimestamp when an index is created); gRPC would log each with
            # a traceback as if the service had failed
            logging.getLogger("grpc._server").setLevel(PYMILVUS_LOG_LEVEL)
        # dedicated: a channel of this gallery's own, closed with it (pymilvus otherwise shares one per
        # address, and a reconnection would get the old channel back, in gRPC's reconnect backoff)
        return MilvusClient(uri=uri, token=self._token, timeout=self.timeout, dedicated=True)

    @staticmethod
    def _check_lite_lock(path: Path) -> None:
        """A clear error when another process has the Milvus Lite database open (Milvus Lite's own
        error is a traceback in the log and "Open local milvus failed")."""
        lock = path / "LOCK"  # the file Milvus Lite flock()s while the database is open
        if not lock.is_file():
            return
        import fcntl
        import os

        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            raise GalleryError(
                f"the Milvus Lite database {path} is open in another process: one process opens a Milvus Lite "
                "database; for several processes run a Milvus server and set DINO_MILVUS_URI=http://HOST:19530"
            ) from exc
        finally:
            os.close(fd)

    def _connect(self) -> None:
        """Connect (once), make or check the collection, load it and count it; raises
        GalleryUnavailableError when Milvus cannot be reached and GalleryError (model mismatch,
        foreign collection) when the collection cannot be used."""
        if not self._connect_lock.acquire(blocking=False):
            raise self._unavailable()  # another thread is connecting right now
        try:
            try:
                if self._client is not None and not self.embedded and not self.health().available:
                    # after an outage a fresh channel connects at once; the old one may wait out
                    # gRPC's reconnection backoff (up to two minutes). (An embedded Milvus Lite runs
                    # in this process: its client stays, and its folder lock is ours.)
                    self._close_client()
                if self._client is None:
                    self._client = self._new_client()
                self._ensure_collection(self._client)
                size = self._count(self._client, self.consistency)
            except GalleryError as exc:
                self._mark_unavailable(str(exc))
                raise
            except _milvus_errors() as exc:
                self._mark_unavailable(_reason(exc))
                raise self._unavailable() from exc
            self._mark_available(size)
        finally:
            self._connect_lock.release()

    def _ensure_collection(self, client: Any) -> None:
        name = self.collection
        if not client.has_collection(name, timeout=self.timeout):
            from pymilvus import MilvusClient

            index = client.prepare_index_params()
            index.add_index(
                schema.VECTOR_FIELD, index_type=self.index_type, metric_type=schema.METRIC, params=self.index_params
            )
            properties = {
                schema.PROP_MODEL_SHA: self.model_sha256,
                schema.PROP_MODEL_NAME: self.model_name,
                schema.PROP_DIM: str(self.dim),
                schema.PROP_FORMAT: schema.FORMAT_VERSION,
            }
            try:
                client.create_collection(
                    name,
                    schema=schema.build_schema(MilvusClient, self.dim, properties),
                    index_params=index,
                    consistency_level=self.consistency,
                    properties=properties,
                    timeout=self.timeout,
                )
                log.info("created Milvus collection %s (dim %d, %s index)", self.where, self.dim, self.index_type)
            except _milvus_errors():
                if not client.has_collection(name, timeout=self.timeout):
                    raise
                # another replica created it first: check theirs like any existing collection
        self._check_collection(client.describe_collection(name, timeout=self.timeout))
        if not client.list_indexes(name, timeout=self.timeout):  # a creator that died before the index
            index = client.prepare_index_params()
            index.add_index(
                schema.VECTOR_FIELD, index_type=self.index_type, metric_type=schema.METRIC, params=self.index_params
            )
            with contextlib.suppress(*_milvus_errors()):  # another replica may be doing the same
                client.create_index(name, index, timeout=self.timeout)
        self._load(client)

    def _check_collection(self, description: dict) -> None:
        """GalleryModelMismatch/GalleryError unless the collection holds this model's gallery."""
        # the properties, or the same JSON in the description (for a Milvus that drops unknown properties)
        properties = description.get("properties") or schema.identity_from_description(description.get("description"))
        fields = {field["name"]: field for field in description.get("fields", [])}
        vector = fields.get(schema.VECTOR_FIELD, {})
        stored_dim = (vector.get("params") or {}).get("dim")
        stored_sha = properties.get(schema.PROP_MODEL_SHA)
        stored_name = properties.get(schema.PROP_MODEL_NAME, "?")
        if stored_sha is None or any(name not in fields for name in schema.FIELDS):
            raise GalleryError(
                f"the Milvus collection {self.collection} is not a DINO gallery (no {schema.PROP_MODEL_SHA} property "
                f"or missing fields {sorted(set(schema.FIELDS) - set(fields))}); "
                "choose another with DINO_MILVUS_COLLECTION"
            )
        if stored_dim is not None and int(stored_dim) != self.dim:
            raise GalleryModelMismatch(
                f"the Milvus collection {self.collection} holds embeddings of dimension {stored_dim} "
                f"(model {stored_name!r}), but the served model {self.model_name!r} makes embeddings of dimension "
                f"{self.dim}: serve that model, or choose another collection with DINO_MILVUS_COLLECTION"
            )
        if stored_sha != self.model_sha256:
            raise GalleryModelMismatch(
                f"the Milvus collection {self.collection} was built with model {stored_name!r} (sha256 {stored_sha}), "
                f"but the served model is {self.model_name!r} (sha256 {self.model_sha256}); its embeddings are not "
                "comparable: serve that model, or choose another collection with DINO_MILVUS_COLLECTION"
            )

    def _load(self, client: Any) -> None:
        state = client.get_load_state(self.collection, timeout=self.timeout).get("state")
        if getattr(state, "name", str(state)) != "Loaded":
            client.load_collection(self.collection, timeout=self.timeout)

    def _count(self, client: Any, consistency: str) -> int:
        rows = client.query(
            self.collection,
            filter="",
            output_fields=["count(*)"],
            consistency_level=consistency,
            timeout=self.timeout,
        )
        return int(rows[0]["count(*)"]) if rows else 0

    def _call(self, operation: Callable[[Any], T]) -> T:
        """``operation(client)`` with the gallery's error handling (see the module docstring)."""
        with self._state_lock:
            ready = self._available and self._client is not None
            wait = not ready and time.monotonic() < self._next_attempt
        if wait:
            raise self._unavailable()
        if not ready:
            try:
                self._connect()
            except GalleryUnavailableError:
                raise
            except GalleryError as exc:  # e.g. the collection now belongs to another model
                raise self._unavailable() from exc
        client = self._client
        try:
            return operation(client)
        except _milvus_errors() as exc:
            if _is_client_bug(exc):
                raise
            if getattr(exc, "code", None) == NOT_LOADED_CODE:  # Milvus (Lite) restarted: load it again
                try:
                    self._load(client)
                    return operation(client)
                except _milvus_errors() as again:
                    exc = again
            self._mark_unavailable(_reason(exc))
            raise self._unavailable() from exc

    def probe(self) -> GalleryHealth:
        """Count the collection (Milvus alive, collection there and loaded) or reconnect; the watchdog
        calls this every ``retry_interval`` seconds. Never raises."""
        if self.health().available and self._client is not None:
            try:
                # Bounded: a gauge does not need to wait for the latest writes
                size = self._count(self._client, "Bounded")
            except _milvus_errors() as exc:
                if getattr(exc, "code", None) == NOT_LOADED_CODE:
                    with contextlib.suppress(*_milvus_errors()):
                        self._load(self._client)
                        return self.health()
                self._mark_unavailable(_reason(exc))
            else:
                with self._state_lock:
                    self._size = size
                return self.health()
        with contextlib.suppress(GalleryError):
            self._connect()
        return self.health()

    def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing must not fail a shutdown or a reconnection
                client.close()

    def close(self) -> None:
        """Close the client; an embedded Milvus Lite is stopped too (its folder lock released)."""
        self._close_client()
        if self.lite_path is not None:
            with contextlib.suppress(ImportError):
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(str(self.lite_path))
        with self._state_lock:
            self._available, self._reason = False, "closed"

    # ------------------------------------------------------------------ reads

    def info(self) -> dict[str, Any]:
        size = self._call(lambda client: self._count(client, self.consistency))
        with self._state_lock:
            self._size = size
        return {
            "size": size,
            "dim": self.dim,
            "model": self.model_name,
            "model_sha256": self.model_sha256,
            "backend": self.backend,
            "index_type": self.index_type,
            "persistent": True,
            "read_only": self.read_only,
            "collection": self.collection,
        }

    def _ordered_ids(self) -> list[str]:
        """Every id in the order added (added_at, then id). Reads all (id, added_at) pairs: Milvus has no
        ordered paging, and its queries return at most 16,384 rows at once, hence the iterator."""

        def read(client: Any) -> list[tuple[int, str]]:
            iterator = client.query_iterator(
                self.collection,
                batch_size=LIST_BATCH_ROWS,
                filter="",
                output_fields=["added_at"],
                consistency_level=self.consistency,
                timeout=self.timeout,
            )
            pairs: list[tuple[int, str]] = []
            try:
                while rows := iterator.next():
                    pairs.extend((int(row["added_at"]), str(row["id"])) for row in rows)
            finally:
                iterator.close()
            return pairs

        pairs = self._call(read)
        pairs.sort()
        ids = [image_id for _, image_id in pairs]
        with self._state_lock:
            self._size = len(ids)
        return ids

    def ids(self) -> list[str]:
        return self._ordered_ids()

    def items(self, offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
        ids = self._ordered_ids()
        page = ids[offset : offset + limit]
        rows = self._get(page, ENTRY_FIELDS)
        entries = [
            {"id": i, "label": rows[i].get("label"), "metadata": rows[i].get("metadata")} for i in page if i in rows
        ]
        return len(ids), entries

    def _get(self, ids: list[str], fields: list[str]) -> dict[str, dict]:
        """The rows of ``ids`` (those that exist) with ``fields``, by id."""
        if not ids:
            return {}
        rows = self._call(
            lambda client: client.get(
                self.collection, ids=ids, output_fields=fields, consistency_level=self.consistency, timeout=self.timeout
            )
        )
        return {str(row["id"]): row for row in rows}

    def _row(self, image_id: str, fields: list[str]) -> dict:
        if not is_valid_image_id(image_id):  # never a client string in a filter unchecked
            raise UnknownImageError(image_id)
        row = self._get([image_id], fields).get(image_id)
        if row is None:
            raise UnknownImageError(image_id)
        return row

    def entry(self, image_id: str) -> dict[str, Any]:
        row = self._row(image_id, ENTRY_FIELDS)
        return {"id": image_id, "label": row.get("label"), "metadata": row.get("metadata")}

    def embedding(self, image_id: str) -> np.ndarray:
        return np.asarray(self._row(image_id, [schema.VECTOR_FIELD])[schema.VECTOR_FIELD], dtype=np.float32)

    def read_image(self, image_id: str) -> bytes:
        data = schema.decode_image(self._row(image_id, ["image"]).get("image"))
        if not data:  # added without an image (a bulk load of embeddings)
            raise UnknownImageError(image_id)
        return data

    def search(self, query: np.ndarray, k: int, exclude: str | None = None) -> list[Neighbor]:
        query = np.asarray(query, dtype=np.float32).reshape(self.dim)
        if exclude is not None and not is_valid_image_id(exclude):
            raise UnknownImageError(exclude)
        params = schema.search_params(self.index_type, self.search_overrides, self.hnsw_ef_search, k)
        hits = self._call(
            lambda client: client.search(
                self.collection,
                data=[query.tolist()],
                anns_field=schema.VECTOR_FIELD,
                limit=k,
                filter=f'id != "{exclude}"' if exclude else "",
                output_fields=ENTRY_FIELDS,
                search_params=params,
                consistency_level=self.consistency,
                timeout=self.timeout,
            )
        )
        results = []
        for hit in hits[0] if hits else []:
            entity = hit.get("entity") or {}
            results.append(
                Neighbor(str(hit["id"]), float(hit["distance"]), entity.get("label"), entity.get("metadata"))
            )
        return results

    # ------------------------------------------------------------------ writes

    def add(
        self,
        embeddings: np.ndarray,
        labels: Sequence[str | None] | None = None,
        metadata: Sequence[dict | None] | None = None,
        images: Sequence[bytes] | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[str]:
        """Add (upsert) the entries; given ``ids`` already in the gallery are replaced. Returns once
        Milvus acknowledged every row. A large add goes in several requests; when one fails, the rows
        of the earlier ones are deleted again (best effort) and the error raised."""
        self.check_writable()
        batch = check_new_entries(self.dim, embeddings, labels, metadata, images, ids)
        now = time.time_ns()
        rows = []
        for position, image_id in enumerate(batch.ids):
            label, meta = batch.labels[position], batch.metadata[position]
            schema.check_label_and_metadata(label, meta)
            image = schema.encode_image(batch.images[position] if batch.images is not None else None)
            rows.append(
                {
                    "id": image_id,
                    schema.VECTOR_FIELD: batch.embeddings[position].tolist(),
                    "label": label,
                    "metadata": meta,
                    "image": image,
                    # nanoseconds + position: the listing keeps a batch in request order
                    "added_at": now + position,
                }
            )
        stored: list[str] = []
        try:
            for request in self._requests(rows):
                self._call(functools.partial(self._upsert, request))
                stored.extend(row["id"] for row in request)
        except BaseException:
            if stored:
                self._forget(stored)
            raise
        if ids is None:  # new ids: each row is a new entry (given ids may replace rows: the next count says)
            with self._state_lock:
                self._size += len(rows)
        return batch.ids

    def _upsert(self, rows: list[dict], client: Any) -> None:
        client.upsert(self.collection, rows, timeout=self.timeout)

    def _requests(self, rows: list[dict]) -> Iterator[list[dict]]:
        """``rows`` cut into insert requests of at most MAX_REQUEST_BYTES (one request for an HTTP add)."""
        request: list[dict] = []
        size = 0
        for row in rows:
            row_bytes = schema.image_row_bytes(row["image"]) + self.dim * 4
            if request and size + row_bytes > MAX_REQUEST_BYTES:
                yield request
                request, size = [], 0
            request.append(row)
            size += row_bytes
        if request:
            yield request

    def _forget(self, ids: list[str]) -> None:
        """Delete the rows of an add that failed half way (best effort: the add was never acknowledged)."""
        try:
            self._call(lambda client: client.delete(self.collection, ids=ids, timeout=self.timeout))
        except GalleryError:
            log.warning("could not remove %d rows of a failed add from %s", len(ids), self.where)

    def delete(self, image_id: str) -> None:
        self.check_writable()
        self._row(image_id, ["id"])  # UnknownImageError when there is no such image
        self._call(lambda client: client.delete(self.collection, ids=[image_id], timeout=self.timeout))
        with self._state_lock:
            self._size = max(0, self._size - 1)
