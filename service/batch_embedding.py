"""``dino embed``: embed every image of a folder into a Parquet dataset, resumably, in one process
or as a Ray Data pipeline on a Ray cluster (``--ray local|auto|ray://HOST:10001``).

Images go through exactly the service's path, as in ``dino index build``: the same safe decoding
with the same limits (``DINO_MAX_IMAGE_PIXELS``, ``DINO_MAX_JPEG_SCANS``) and evaluation transform
(:class:`service.preprocess.Preprocessor`), the same :class:`service.runtime.OnnxModel`, and the
same L2 normalisation (:func:`service.state.l2_normalize`), so that a row's embedding is what
``POST /embed`` answers for that file.

The output folder is one Parquet dataset: read it whole with ``pyarrow.parquet.read_table(OUTPUT)``,
``pandas.read_parquet(OUTPUT)``, ``ray.data.read_parquet(OUTPUT)`` or DuckDB's
``read_parquet('OUTPUT/*.parquet')``. Every data file has the schema :data:`SCHEMA`::

    id         string         32 hex digits: the first 128 bits of sha256(path) (:func:`image_id`)
    path       string         the image's path relative to IMAGES, '/'-separated
    label      string         its subfolder below IMAGES ("cat", "a/b"); null at the top level
    embedding  list<float32>  the [CLS] embedding, L2-normalised (POST /embed's default)

    OUTPUT/
      _embed.json        what made it: model name, sha256 and dim, the images folder, the id rule
      part-*.parquet     the data files, each written whole (about --rows-per-part rows each)
      _skipped.jsonl     the unreadable files of the latest run: {"path": ..., "reason": ...} per line
      .lock              flock()ed by the run in progress
      .ray-*/            Ray mode: where a running job writes; moved into OUTPUT when it ends

Dataset readers (pyarrow, pandas, Ray, Spark) skip names that start with ``_`` or ``.``.

The id depends only on the relative path, so a rerun, a Ray run and a later import of the Parquet
into a gallery agree on it; it has the form of the gallery's ids (32 lowercase hex digits).

Resume: a run first reads the ``id`` column of the existing data files and embeds only the other
images. A data file only ever appears whole: the single-process writer writes a hidden temporary
file and renames it, and Ray writes into a hidden staging folder whose files are moved into OUTPUT
when the job ends, or at the start of the next run if it was interrupted (a file whose Parquet
footer cannot be read, i.e. torn by the interruption, is deleted and its images are embedded again).
An interrupted run therefore keeps every finished part, and no image is written twice.

Unreadable files (not an image, corrupt, too large, unreadable from disk) are skipped, never fatal:
they are listed in the summary and in ``_skipped.jsonl``, and retried by the next run.

With ``--ray`` the same job is a Ray Data pipeline (:func:`embed_with_ray`): the driver lists the
images and skips the finished ones, Ray tasks read, decode and preprocess them, a pool of actors
runs onnxruntime (``--workers``, ``--cpus-per-worker``, ``--gpus-per-worker``), and Ray writes the
Parquet files. ``--ray local`` starts a Ray for the job and stops it at the end; ``auto`` and
``ray://HOST:10001`` join a running cluster, whose nodes need this package with the ``ray`` extra
and the same paths for the images, the model and the output (a shared filesystem).
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
from pydantic import ValidationError
from tqdm import tqdm

from dino.images import IMAGE_EXTENSIONS, ImageInputError, label_of, list_image_files
from service.durable import fsync_dir, write_file_durably
from service.preprocess import Preprocessor
from service.runtime import ModelLoadError, OnnxModel
from service.settings import ModelNotFoundError, ServiceSettings
from service.state import embed_tensors

log = logging.getLogger(__name__)

#: the columns of every data file (both modes write exactly this schema)
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),
    ]
)
MANIFEST_FILE = "_embed.json"
SKIPPED_FILE = "_skipped.jsonl"
LOCK_FILE = ".lock"
PART_PREFIX = "part-"
PARQUET_SUFFIX = ".parquet"
#: a temporary data file (hidden, so that readers never see it half-written)
TMP_PREFIX = ".tmp-"
#: where a Ray job writes before its files are moved into the output folder (hidden, as above)
RAY_STAGING_PREFIX = ".ray-"
#: prefix of a data file that could not be read, kept aside (hidden) rather than deleted
CORRUPT_PREFIX = ".corrupt-"
FORMAT = "dino-embed"
FORMAT_VERSION = 1
#: hex digits of sha256(relative path) that make an id: 128 bits, the width of the gallery's ids, so
#: that the chance of two of 100 million paths colliding is about 1e-23
ID_HEX_DIGITS = 32
ID_RULE = f"sha256(utf-8 path relative to the images folder, '/'-separated), first {ID_HEX_DIGITS} hex digits"

DEFAULT_BATCH_SIZE = 32
#: rows per data file: at most this much work is lost when a single-process run is interrupted
DEFAULT_ROWS_PER_PART = 4096
#: decoding threads of a single-process run: the decoding of the next batch overlaps the inference
#: of the current one, and onnxruntime uses the cores too
DEFAULT_THREADS = max(1, min(8, os.cpu_count() or 1))
#: unreadable files named in the printed summary (all of them are in the sidecar)
SUMMARY_SKIPPED_SHOWN = 10

#: ``--ray`` values: start a Ray instance for the job, or join the running cluster of this machine
RAY_LOCAL, RAY_AUTO = "local", "auto"
#: a Ray client address of a remote cluster
RAY_CLIENT_SCHEME = "ray://"
#: the last line of a Python traceback: ``package.module.SomeError: message``
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (.*)$")
#: Ray Data warnings that do not apply to this job: the progress bars are off when asked for, and
#: "no available CPUs" shows up because Ray's view of the free CPUs lags behind the tasks that just
#: computed the input blocks' metadata (a job that would really have no CPU for decoding is refused
#: before it starts: :func:`check_workers_fit`)
RAY_FALSE_ALARMS = ("Progress bars disabled", "Warning: The Ray cluster currently does not have any available CPUs")
#: object store of a local Ray: enough for many batches in flight (a 224 px image is 0.6 MB of
#: float32), while leaving the memory of a shared machine alone; Ray spills to disk beyond it
LOCAL_OBJECT_STORE_BYTES = 1 << 30
#: input blocks handed to Ray per CPU of the cluster (load balance) ...
INPUT_BLOCKS_PER_CPU = 4
#: ... of at most this many paths each (a block is also the unit of work redone after a failure)
MAX_INPUT_BLOCK_ROWS = 1024
#: memory Ray reserves for an inference actor: a Ray worker process with onnxruntime, NumPy and
#: pyarrow loaded (the default model's actor peaked at 233 MiB), plus the model several times over
#: (the file, onnxruntime's optimised copy, a batch's activations)
ACTOR_BASE_MEMORY_BYTES = 384 << 20
ACTOR_MEMORY_PER_MODEL_BYTE = 4
#: images the driver decodes and embeds to split a CPU cluster between decoding and inference
CALIBRATION_IMAGES = 8
#: the split when none of those images is readable
DEFAULT_INFERENCE_SHARE = 0.5


class EmbedError(Exception):
    """A problem with the command's input or output (one line for the user, no traceback)."""


# --------------------------------------------------------------------------------------------------
# images, ids and rows
# --------------------------------------------------------------------------------------------------


def image_id(relative_path: str) -> str:
    """The id of an image: the first :data:`ID_HEX_DIGITS` hex digits of sha256 of its relative path.

    Computable by anyone from the path alone (``hashlib.sha256(path.encode()).hexdigest()[:32]``),
    so that reruns, Ray runs and later imports agree without a lookup table.
    """
    return hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:ID_HEX_DIGITS]


@dataclass(frozen=True)
class ImageEntry:
    """One image to embed: its id, its path relative to the images folder and its label."""

    id: str
    path: str
    label: str | None


def list_entries(images_dir: Path) -> list[ImageEntry]:
    """Every image below ``images_dir`` (sorted, as ``dino index build`` lists them), with id and label."""
    entries = []
    for file in list_image_files(images_dir):
        relative = file.relative_to(images_dir).as_posix()
        entries.append(ImageEntry(image_id(relative), relative, label_of(file, images_dir)))
    return entries


def prepare_file(preprocessor: Preprocessor, path: Path) -> tuple[np.ndarray | None, str | None]:
    """(model input [3, H, W], None) for a readable image, (None, reason) for any other file."""
    try:
        return preprocessor.prepare(path.read_bytes()).tensor, None
    except ImageInputError as exc:
        return None, exc.detail
    except OSError as exc:  # unreadable from disk (permissions, a folder named like an image, I/O errors)
        return None, f"cannot read the file: {exc.strerror or exc}"


def rows_table(ids: Sequence[str], paths: Sequence[str], labels: Sequence[str | None], embeddings: np.ndarray):
    """A :data:`SCHEMA` table of rows (``embeddings`` [B, D] float32)."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    dim = embeddings.shape[1] if embeddings.ndim == 2 else 0
    offsets = np.arange(0, (len(ids) + 1) * dim, dim, dtype=np.int32)
    vectors = pa.ListArray.from_arrays(pa.array(offsets), pa.array(embeddings.reshape(-1)))
    columns = [pa.array(ids, pa.string()), pa.array(paths, pa.string()), pa.array(labels, pa.string()), vectors]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


# --------------------------------------------------------------------------------------------------
# the output folder
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkippedFile:
    """An image that could not be embedded, and why."""

    path: str
    reason: str


class EmbeddingDataset:
    """The output folder of ``dino embed``, held (flock) by one run from :meth:`open` to :meth:`close`.

    Opening checks that the folder is empty or one made for the same model, cleans up what an
    interrupted run left (temporary files; Ray staging folders, whose whole files are kept) and
    reads the ids already embedded.
    """

    def __init__(self, path: Path, lock_fd: int):
        self.path = path
        self._lock_fd = lock_fd
        self._run = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        self._parts_written = 0

    @classmethod
    def open(cls, path: Path, model: OnnxModel, images_dir: Path) -> EmbeddingDataset:
        if path.exists() and not path.is_dir():
            raise EmbedError(f"{path} exists and is not a folder (the output is a folder of Parquet files)")
        manifest_path = path / MANIFEST_FILE
        if path.is_dir() and not manifest_path.is_file() and any(path.iterdir()):
            raise EmbedError(
                f"{path} is not empty and was not made by dino embed (no {MANIFEST_FILE}); choose a new folder"
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise EmbedError(f"cannot create the output folder {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise EmbedError(f"{path} is being written by another dino embed; wait for it to finish") from None
        dataset = cls(path, lock_fd)
        try:
            dataset._check_or_write_manifest(model, images_dir)
            dataset._clean_up()
        except BaseException:
            dataset.close()
            raise
        return dataset

    def _check_or_write_manifest(self, model: OnnxModel, images_dir: Path) -> None:
        manifest_path = self.path / MANIFEST_FILE
        if manifest_path.is_file():
            try:
                manifest = json.loads(manifest_path.read_text())
                made_by = (manifest["model"]["sha256"], manifest["model"]["name"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise EmbedError(f"{manifest_path} is unreadable ({exc}); choose a new output folder") from exc
            if made_by[0] != model.sha256:
                raise EmbedError(
                    f"{self.path} holds embeddings of model {made_by[1]!r} (sha256 {made_by[0][:12]}...), not of "
                    f"{model.name!r} ({model.sha256[:12]}...); choose a new output folder"
                )
            if manifest.get("images") != str(images_dir.resolve()):
                log.warning("%s was started on %s; adding images of %s", self.path, manifest.get("images"), images_dir)
            return
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": {"name": model.name, "sha256": model.sha256, "dim": model.spec.embed_dim},
            "images": str(images_dir.resolve()),
            "normalized": "l2",
            "id": ID_RULE,
            "label": "the image's subfolder below the images folder, null at its top level",
            "columns": [f"{f.name}: {f.type}" for f in SCHEMA],
        }
        write_file_durably(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())

    def _clean_up(self) -> None:
        """Remove temporary files and adopt the whole files of interrupted Ray jobs."""
        for tmp in self.path.glob(f"{TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
        for staging in sorted(self.path.glob(f"{RAY_STAGING_PREFIX}*")):
            rows = self.adopt(staging)
            log.info("kept %d rows written by an interrupted Ray job (%s)", rows, staging.name)

    def data_files(self) -> list[Path]:
        """The data files of the dataset (what readers read), sorted by name."""
        return sorted(
            p for p in self.path.iterdir() if p.name.startswith(PART_PREFIX) and p.name.endswith(PARQUET_SUFFIX)
        )

    def existing_ids(self) -> pa.Array:
        """The ids of every row in the data files (only the id column is read)."""
        chunks = []
        for file in self.data_files():
            try:
                chunks.append(pq.ParquetFile(file).read(columns=["id"]).column("id").combine_chunks())
            except (OSError, pa.ArrowException) as exc:
                # whole files only ever appear here, so this is damage from outside: keep it aside, redo its images
                aside = file.with_name(CORRUPT_PREFIX + file.name)
                log.warning("%s is unreadable (%s): moved to %s, its images will be embedded again", file, exc, aside)
                os.replace(file, aside)
        return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())

    def write_part(self, table: pa.Table) -> Path:
        """Write one data file, whole: a hidden temporary file, fsynced, then renamed."""
        self._parts_written += 1
        final = self.path / f"{PART_PREFIX}{self._run}-{self._parts_written:06d}{PARQUET_SUFFIX}"
        tmp = self.path / f"{TMP_PREFIX}{final.name}"
        pq.write_table(table, tmp, row_group_size=max(1, table.num_rows))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(self.path)
        return final

    def new_staging(self) -> Path:
        staging = self.path / f"{RAY_STAGING_PREFIX}{self._run}"
        staging.mkdir()
        return staging

    def adopt(self, staging: Path) -> int:
        """Move the readable Parquet files of a Ray staging folder into the dataset; returns their rows.

        A file whose footer cannot be read was torn by an interruption: its images are not in the
        dataset and the next run embeds them again.
        """
        rows = 0
        for file in sorted(staging.rglob(f"*{PARQUET_SUFFIX}")):
            try:
                metadata = pq.read_metadata(file)
            except (OSError, pa.ArrowException):
                log.warning("removing %s: an incomplete file of an interrupted job", file)
                continue
            if metadata.num_rows == 0:
                continue
            self._parts_written += 1
            os.replace(file, self.path / f"{PART_PREFIX}{self._run}-{self._parts_written:06d}{PARQUET_SUFFIX}")
            rows += metadata.num_rows
        fsync_dir(self.path)
        shutil.rmtree(staging, ignore_errors=True)
        return rows

    def write_skipped(self, skipped: Sequence[SkippedFile]) -> Path:
        """Replace the sidecar with this run's unreadable files (JSON lines: any file name fits)."""
        lines = "".join(json.dumps({"path": s.path, "reason": s.reason}) + "\n" for s in skipped)
        path = self.path / SKIPPED_FILE
        write_file_durably(path, lines.encode())
        return path

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1


@dataclass(frozen=True)
class EmbeddingRows:
    """A batch of rows of a dataset: ids, paths, labels and the embeddings [n, D] float32."""

    ids: list[str]
    paths: list[str]
    labels: list[str | None]
    embeddings: np.ndarray


class StoredEmbeddings:
    """A finished ``dino embed`` dataset, read back (``dino index build --embeddings``).

    Reading needs no lock: data files only ever appear whole, so a reader sees the files finished
    when it was opened even while another run adds more.
    """

    def __init__(self, path: Path):
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise EmbedError(f"{path} is not a dino embed output folder (no {MANIFEST_FILE})")
        try:
            manifest = json.loads(manifest_path.read_text())
            model = manifest["model"]
            self.model_name, self.model_sha256, self.dim = str(model["name"]), str(model["sha256"]), int(model["dim"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EmbedError(f"{manifest_path} is unreadable ({exc})") from exc
        self.path = path
        self.files = sorted(
            p for p in path.iterdir() if p.name.startswith(PART_PREFIX) and p.name.endswith(PARQUET_SUFFIX)
        )
        self.num_rows = 0
        for file in self.files:
            try:
                parquet = pq.ParquetFile(file)
            except (OSError, pa.ArrowException) as exc:
                raise EmbedError(f"{file} is unreadable ({exc}); rerun dino embed on the same output") from exc
            if not parquet.schema_arrow.equals(SCHEMA):
                raise EmbedError(f"{file} does not have the columns of dino embed ({', '.join(SCHEMA.names)})")
            self.num_rows += parquet.metadata.num_rows

    def batches(self, rows: int) -> Iterator[EmbeddingRows]:
        """The rows in batches of at most ``rows``, file by file."""
        for file in self.files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=rows):
                vectors = batch.column("embedding")
                flat = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                if len(flat) != len(vectors) * self.dim:
                    raise EmbedError(f"{file} holds embeddings that are not {self.dim}-d, as {MANIFEST_FILE} says")
                yield EmbeddingRows(
                    ids=batch.column("id").to_pylist(),
                    paths=batch.column("path").to_pylist(),
                    labels=batch.column("label").to_pylist(),
                    embeddings=flat.reshape(len(vectors), self.dim),
                )


# --------------------------------------------------------------------------------------------------
# one process
# --------------------------------------------------------------------------------------------------


@dataclass
class RunCounts:
    """What one run embedded and skipped."""

    embedded: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)


def _batches(entries: Sequence[ImageEntry], size: int) -> Iterator[Sequence[ImageEntry]]:
    for start in range(0, len(entries), size):
        yield entries[start : start + size]


def embed_in_process(
    model: OnnxModel,
    preprocessor: Preprocessor,
    images_dir: Path,
    entries: Sequence[ImageEntry],
    dataset: EmbeddingDataset,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int = DEFAULT_THREADS,
    rows_per_part: int = DEFAULT_ROWS_PER_PART,
    progress: bool = True,
) -> RunCounts:
    """Embed ``entries`` with decoding threads and one onnxruntime session; a data file per ``rows_per_part``."""
    counts = RunCounts()
    pending_tables: list[pa.Table] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal pending_tables, pending_rows
        if pending_rows:
            dataset.write_part(pa.concat_tables(pending_tables))
        pending_tables, pending_rows = [], 0

    def submit(pool: ThreadPoolExecutor, batch: Sequence[ImageEntry]) -> list[Future]:
        return [pool.submit(prepare_file, preprocessor, images_dir / entry.path) for entry in batch]

    with (
        ThreadPoolExecutor(max_workers=threads) as pool,
        tqdm(total=len(entries), unit="img", desc="embedding", disable=not progress) as bar,
    ):
        batches = _batches(entries, batch_size)
        current = next(batches, None)
        futures = submit(pool, current) if current is not None else []
        try:
            while current is not None:
                # decode the next batch while this one is in onnxruntime
                following = next(batches, None)
                next_futures = submit(pool, following) if following is not None else []
                good: list[tuple[ImageEntry, np.ndarray]] = []
                for entry, future in zip(current, futures, strict=True):
                    tensor, reason = future.result()
                    if tensor is None:
                        log.warning("skipping %s: %s", entry.path, reason)
                        counts.skipped.append(SkippedFile(entry.path, str(reason)))
                    else:
                        good.append((entry, tensor))
                if good:
                    embeddings = embed_tensors(model, np.stack([tensor for _, tensor in good]))
                    done = [entry for entry, _ in good]
                    pending_tables.append(
                        rows_table([e.id for e in done], [e.path for e in done], [e.label for e in done], embeddings)
                    )
                    pending_rows += len(done)
                    counts.embedded += len(done)
                    if pending_rows >= rows_per_part:
                        flush()
                bar.update(len(current))
                current, futures = following, next_futures
        except KeyboardInterrupt:
            flush()  # keep the rows that are finished: an interrupted run loses nothing it embedded
            raise
        flush()
    return counts


# --------------------------------------------------------------------------------------------------
# Ray Data
# --------------------------------------------------------------------------------------------------


class SkippedFilesLog:
    """A Ray actor (made with ``ray.remote`` at run time) that gathers the decoding tasks' unreadable files."""

    def __init__(self) -> None:
        self.files: list[tuple[str, str]] = []

    def add(self, files: list[tuple[str, str]]) -> None:
        self.files.extend(files)

    def all(self) -> list[tuple[str, str]]:
        return self.files


def decode_batch(batch: pa.Table, *, images_dir: str, preprocessor: Preprocessor, skipped_log: Any) -> pa.Table:
    """Ray task: (id, path, label) rows -> the readable ones with their model input as ``pixels``.

    ``pixels`` is a fixed-size list of 3*H*W float32 (plain Arrow, no extension type); unreadable
    files are reported to the ``skipped_log`` actor and dropped.
    """
    import ray

    root = Path(images_dir)
    ids, paths, labels = (batch.column(name).to_pylist() for name in ("id", "path", "label"))
    keep: list[int] = []
    tensors: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []
    for row, path in enumerate(paths):
        tensor, reason = prepare_file(preprocessor, root / path)
        if tensor is None:
            failures.append((path, str(reason)))
        else:
            keep.append(row)
            tensors.append(tensor)
    if failures:
        ray.get(skipped_log.add.remote(failures))  # waited for: the report must not be lost with the task
    side = preprocessor.transform.image_size
    flat = np.stack(tensors).reshape(-1) if tensors else np.zeros(0, np.float32)
    return pa.table(
        {
            "id": pa.array([ids[i] for i in keep], pa.string()),
            "path": pa.array([paths[i] for i in keep], pa.string()),
            "label": pa.array([labels[i] for i in keep], pa.string()),
            "pixels": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), 3 * side * side),
        }
    )


class OnnxEmbedder:
    """Ray actor (``map_batches`` with a class): one onnxruntime session, loaded once per actor."""

    def __init__(self, model_dir: str, provider: str, precision: str, verify_sha256: bool, threads: int):
        self.model = OnnxModel(
            model_dir, provider=provider, precision=precision, verify_sha256=verify_sha256, intra_op_threads=threads
        )
        self.side = self.model.spec.image_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return SCHEMA.empty_table()
        pixels = batch.column("pixels").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        embeddings = embed_tensors(self.model, pixels.reshape(-1, 3, self.side, self.side))
        return rows_table(
            batch.column("id").to_pylist(),
            batch.column("path").to_pylist(),
            batch.column("label").to_pylist(),
            embeddings,
        )


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray: where, and the resources of the inference actors."""

    address: str  #: "local", "auto" or "ray://host:10001"
    local_cpus: int | None = None  #: CPUs of a local Ray (default: all of this machine's)
    workers: int | None = None  #: inference actors (default: :func:`default_workers`)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


def _without_false_alarms(record: logging.LogRecord) -> bool:
    """Logging filter of Ray Data's console: drops the warnings in :data:`RAY_FALSE_ALARMS`."""
    return not record.getMessage().startswith(RAY_FALSE_ALARMS)


def start_ray(options: RayOptions, progress: bool = True) -> None:
    """``ray.init`` for ``options.address``. Quiet: no dashboard, no usage statistics, and warnings only
    (Ray Data's own progress lines too without ``progress``; its full log stays in the session folder)."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise EmbedError(f"--ray needs Ray Data ({exc.name} is missing): pip install '.[serve,ray]'") from exc
    # no usage statistics are sent, and none asked for on the terminal
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # errors only from Ray's core (its notices at startup are for Ray's operators, not for this job's user)
    common: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if options.address == RAY_LOCAL:
            ray.init(
                address="local",
                num_cpus=options.local_cpus,
                num_gpus=None if options.gpus_per_worker else 0,
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                **common,
            )
        else:
            ray.init(address=options.address, **common)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise EmbedError(f"cannot start or join Ray at {options.address!r}: {str(exc).splitlines()[0]}") from exc
    ray.data.DataContext.get_current().enable_progress_bars = progress
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console, not the session's log file
            handler.addFilter(_without_false_alarms)
            if not progress:
                handler.setLevel(logging.WARNING)


def inference_share(
    model: OnnxModel, preprocessor: Preprocessor, images_dir: Path, entries: Sequence[ImageEntry], batch_size: int
) -> float:
    """The fraction of an image's CPU time that is inference (the rest is reading and decoding),
    measured on the first images: it decides how many of a CPU cluster's cores go to the model.

    CPU time (``process_time``), not wall time: the driver's session may use several threads where
    an actor uses ``--cpus-per-worker``.
    """
    tensors, decode_seconds = [], 0.0
    for entry in entries[:CALIBRATION_IMAGES]:
        start = time.process_time()
        tensor, _ = prepare_file(preprocessor, images_dir / entry.path)
        decode_seconds += time.process_time() - start
        if tensor is not None:
            tensors.append(tensor)
    if not tensors:
        return DEFAULT_INFERENCE_SHARE
    batch = np.stack((tensors * batch_size)[:batch_size])
    embed_tensors(model, batch)  # warm-up: the first run allocates
    start = time.process_time()
    embed_tensors(model, batch)
    infer_seconds = (time.process_time() - start) / len(batch) * min(len(entries), CALIBRATION_IMAGES)
    return infer_seconds / max(infer_seconds + decode_seconds, sys.float_info.min)


def default_workers(options: RayOptions, resources: dict[str, float], share: float) -> int:
    """Inference actors when ``--workers`` is not given: one per GPU slot with GPUs; on CPUs, the
    measured inference share of the cores, leaving at least one core to decoding and writing."""
    if options.gpus_per_worker:
        return max(1, int(resources.get("GPU", 0) // options.gpus_per_worker))
    cpus = resources.get("CPU", 1.0)
    wanted = round(cpus * share / options.cpus_per_worker)
    return max(1, min(wanted, int((cpus - 1) // options.cpus_per_worker)))


def check_workers_fit(options: RayOptions, workers: int, resources: dict[str, float]) -> None:
    """Refuse actors that would take every CPU (no decoding, the job would hang) or more GPUs than there are."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if workers * options.cpus_per_worker > cpus - 1:
        raise EmbedError(
            f"{workers} inference actors of {options.cpus_per_worker:g} CPUs leave no CPU for decoding "
            f"(the cluster has {cpus:g}); lower --workers or --cpus-per-worker"
        )
    if workers * options.gpus_per_worker > gpus:
        raise EmbedError(
            f"{workers} inference actors of {options.gpus_per_worker:g} GPUs need more than the cluster's {gpus:g} GPUs"
        )


def embed_with_ray(
    options: RayOptions,
    settings: ServiceSettings,
    model: OnnxModel,
    preprocessor: Preprocessor,
    images_dir: Path,
    entries: Sequence[ImageEntry],
    dataset: EmbeddingDataset,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    rows_per_part: int = DEFAULT_ROWS_PER_PART,
) -> RunCounts:
    """The same job as :func:`embed_in_process` as a Ray Data pipeline, on the Ray started by :func:`start_ray`.

    paths (driver, in blocks) -> read + decode + preprocess (Ray tasks, 1 CPU each, as many as
    there are free CPUs) -> onnxruntime (a pool of ``workers`` actors, each with its session) ->
    Parquet (a staging folder, adopted into the dataset at the end). The images, model and output
    folders must be at the same paths on every node (a shared filesystem).
    """
    import ray
    import ray.data

    resources = ray.cluster_resources()
    cluster_cpus = max(1, int(resources.get("CPU", 1)))
    if options.workers:
        workers = options.workers
    else:
        share = inference_share(model, preprocessor, images_dir, entries, batch_size)
        workers = default_workers(options, resources, share)
        log.info("inference takes %.0f%% of an image's CPU time: %d inference actors", 100 * share, workers)
    check_workers_fit(options, workers, resources)
    block_rows = max(1, min(MAX_INPUT_BLOCK_ROWS, math.ceil(len(entries) / (INPUT_BLOCKS_PER_CPU * cluster_cpus))))
    blocks = [
        pa.table(
            {
                "id": pa.array([e.id for e in chunk], pa.string()),
                "path": pa.array([e.path for e in chunk], pa.string()),
                "label": pa.array([e.label for e in chunk], pa.string()),
            }
        )
        for chunk in _batches(entries, block_rows)
    ]
    skipped_log: Any = ray.remote(num_cpus=0)(SkippedFilesLog).remote()
    staging = dataset.new_staging()
    # onnxruntime's threads = the CPUs Ray reserves for the actor (at least one)
    threads = max(1, int(options.cpus_per_worker))
    model_bytes = (model.model_dir / model.file).stat().st_size
    # Ray fuses a task stage into the next actor stage when their resources match (the actors would
    # then decode too, one image after the other); the actors' memory reservation keeps the stages
    # apart, so that decoding scales to the free CPUs and the actors only run the model
    pipeline = (
        ray.data.from_arrow(blocks)
        .map_batches(
            functools.partial(
                decode_batch, images_dir=str(images_dir.resolve()), preprocessor=preprocessor, skipped_log=skipped_log
            ),
            batch_format="pyarrow",
            batch_size=batch_size,
            num_cpus=1,
        )
        .map_batches(
            OnnxEmbedder,
            batch_format="pyarrow",
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=options.cpus_per_worker,
            num_gpus=options.gpus_per_worker or None,
            memory=ACTOR_BASE_MEMORY_BYTES + ACTOR_MEMORY_PER_MODEL_BYTE * model_bytes,
            fn_constructor_kwargs={
                "model_dir": str(model.model_dir.resolve()),
                "provider": settings.provider,
                "precision": model.precision,  # the file the driver resolved: every actor serves the same one
                "verify_sha256": settings.verify_sha256,
                "threads": threads,
            },
        )
    )
    log.info(
        "Ray: %d images in %d blocks, %d inference actors, %d CPUs", len(entries), len(blocks), workers, cluster_cpus
    )
    try:
        pipeline.write_parquet(str(staging), schema=SCHEMA, min_rows_per_file=rows_per_part)
    except ray.exceptions.RayError as exc:
        raise EmbedError(f"the Ray job failed: {root_cause(exc)}") from exc
    skipped = [SkippedFile(path, reason) for path, reason in ray.get(skipped_log.all.remote())]
    embedded = dataset.adopt(staging)
    return RunCounts(embedded=embedded, skipped=sorted(skipped, key=lambda s: s.path))


def root_cause(exc: BaseException) -> str:
    """One line for a failed Ray job: the worker's own exception (``Type: message``).

    Ray keeps a worker's exception in ``cause``, or only as the text of a traceback (an actor that
    died in its constructor); Ray Data chains its own exceptions with ``raise ... from``.
    """
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        inner = getattr(current, "cause", None)
        current = inner if isinstance(inner, BaseException) else current.__cause__
    for candidate in reversed(chain):
        if not type(candidate).__module__.startswith("ray") and str(candidate).strip():
            return f"{type(candidate).__name__}: {str(candidate).strip().splitlines()[-1]}"
    for candidate in chain:
        matches = [EXCEPTION_LINE.match(line) for line in str(candidate).splitlines()]
        own = [m for m in matches if m is not None and not m.group(1).startswith("ray")]
        if own:
            return f"{own[-1].group(1).rsplit('.', 1)[-1]}: {own[-1].group(2)}"
    first = next((line for line in str(exc).splitlines() if line.strip()), "no message")
    return f"{type(exc).__name__}: {first}"


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedResult:
    """What one ``dino embed`` did."""

    embedded: int  #: images embedded by this run
    skipped: list[SkippedFile]  #: unreadable images of this run
    already: int  #: images found in the output and not embedded again
    remaining: int  #: images left for a later run (``--limit``)
    total_rows: int  #: rows in the dataset afterwards
    seconds: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (default: DINO_MODEL_DIR, else the first folder of models/)")
    parser.add_argument("--images", required=True, help="image folder (recursive); labels from subfolder names")
    parser.add_argument(
        "--output", required=True, help="output folder, one Parquet dataset (rerun the command to resume)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images per inference call (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--rows-per-part",
        type=int,
        default=DEFAULT_ROWS_PER_PART,
        help=f"rows per Parquet file, the unit of resume (default {DEFAULT_ROWS_PER_PART})",
    )
    parser.add_argument("--limit", type=int, default=None, help="embed at most this many of the remaining images")
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help=f"decoding threads without --ray (default {DEFAULT_THREADS})",
    )
    parser.add_argument(
        "--provider", choices=["auto", "cpu", "cuda"], default=None, help="default: DINO_PROVIDER or auto"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray_group = parser.add_argument_group("Ray", "run the job as a Ray Data pipeline")
    ray_group.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="'local' (start Ray for this job), 'auto' (the cluster this machine belongs to) or ray://HOST:10001",
    )
    ray_group.add_argument("--ray-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    ray_group.add_argument(
        "--workers",
        type=int,
        default=None,
        help="inference actors (default: one per GPU slot with --gpus-per-worker, else the share of the CPUs "
        "that inference takes, measured on the first images, leaving one CPU or more to decoding)",
    )
    ray_group.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="CPUs (onnxruntime threads) per inference actor (default 1)"
    )
    ray_group.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        help="GPUs per inference actor (default 0; use with --provider cuda)",
    )


def _check_args(args: argparse.Namespace) -> None:
    positive = {"--batch-size": args.batch_size, "--rows-per-part": args.rows_per_part, "--threads": args.threads}
    positive.update({"--limit": args.limit, "--ray-cpus": args.ray_cpus, "--workers": args.workers})
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise EmbedError(f"{flag} must be at least 1 (got {value})")
    if args.cpus_per_worker <= 0 or args.gpus_per_worker < 0:
        raise EmbedError("--cpus-per-worker must be positive and --gpus-per-worker not negative")
    if args.ray is not None and args.ray not in (RAY_LOCAL, RAY_AUTO) and not args.ray.startswith(RAY_CLIENT_SCHEME):
        raise EmbedError(f"--ray must be 'local', 'auto' or {RAY_CLIENT_SCHEME}HOST:PORT (got {args.ray!r})")
    if args.ray is None and (args.ray_cpus or args.workers):
        raise EmbedError("--ray-cpus and --workers only apply with --ray")


def run(args: argparse.Namespace) -> EmbedResult:
    """The whole command, without printing; raises :class:`EmbedError` for bad input."""
    _check_args(args)
    images_dir = Path(args.images)
    if not images_dir.is_dir():
        raise EmbedError(f"image folder {images_dir} does not exist")
    overrides = {"model_dir": args.model, "provider": args.provider}
    try:
        settings = ServiceSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:  # a DINO_* environment variable with a bad value
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise EmbedError(f"invalid settings: {problems}") from exc
    try:
        # with Ray, the driver only checks the model (on the CPU: it may have no GPU); the actors run it
        model = OnnxModel.from_settings(settings, provider="cpu" if args.ray else settings.provider)
    except (ModelNotFoundError, ModelLoadError) as exc:
        raise EmbedError(str(exc)) from exc
    entries = list_entries(images_dir)
    if not entries:
        raise EmbedError(f"no images in {images_dir} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    preprocessor = Preprocessor.for_model(model.spec, settings.max_image_pixels, settings.max_jpeg_scans)
    started = time.perf_counter()
    dataset = EmbeddingDataset.open(Path(args.output), model, images_dir)
    try:
        done = dataset.existing_ids()
        is_done = pc.is_in(pa.array([e.id for e in entries], pa.string()), value_set=done).to_numpy(
            zero_copy_only=False
        )
        todo = [entry for entry, finished in zip(entries, is_done, strict=True) if not finished]
        already = len(entries) - len(todo)
        limit = args.limit if args.limit is not None else len(todo)
        remaining = max(0, len(todo) - limit)
        todo = todo[:limit]
        progress = not args.no_progress
        if not todo:
            counts = RunCounts()
        elif args.ray is None:
            counts = embed_in_process(
                model,
                preprocessor,
                images_dir,
                todo,
                dataset,
                batch_size=args.batch_size,
                threads=args.threads,
                rows_per_part=args.rows_per_part,
                progress=progress,
            )
        else:
            options = RayOptions(args.ray, args.ray_cpus, args.workers, args.cpus_per_worker, args.gpus_per_worker)
            start_ray(options, progress)
            try:
                counts = embed_with_ray(
                    options,
                    settings,
                    model,
                    preprocessor,
                    images_dir,
                    todo,
                    dataset,
                    batch_size=args.batch_size,
                    rows_per_part=args.rows_per_part,
                )
            finally:
                import ray

                ray.shutdown()
        dataset.write_skipped(counts.skipped)
        total_rows = sum(pq.read_metadata(f).num_rows for f in dataset.data_files())
    finally:
        dataset.close()
    return EmbedResult(counts.embedded, counts.skipped, already, remaining, total_rows, time.perf_counter() - started)


def main(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run(args)
    except EmbedError as exc:
        print(f"dino embed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the output's disk is full or read-only, a file vanished, ...
        print(f"dino embed: {exc.strerror or exc}: {exc.filename or args.output}", file=sys.stderr)
        return 1
    rate = result.embedded / result.seconds if result.seconds > 0 else 0.0
    print(
        f"embedded {result.embedded} images in {result.seconds:.1f} s ({rate:.1f} img/s); "
        f"{result.already} were already in {args.output}, {len(result.skipped)} skipped as unreadable"
        + (f", {result.remaining} left for a later run (--limit)" if result.remaining else "")
        + f"; {args.output} holds {result.total_rows} images"
    )
    if result.skipped:
        print(f"unreadable files (all of them in {Path(args.output) / SKIPPED_FILE}):")
        for skipped in result.skipped[:SUMMARY_SKIPPED_SHOWN]:
            print(f"  {skipped.path}: {skipped.reason}")
        if len(result.skipped) > SUMMARY_SKIPPED_SHOWN:
            print(f"  ... and {len(result.skipped) - SUMMARY_SKIPPED_SHOWN} more")
    return 0
