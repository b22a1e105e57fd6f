"""``dino index build``: fill a gallery offline, from an image folder or from ``dino embed`` output.

Two sources:

- ``--images DIR``: every image below DIR is embedded. Labels come from the subfolder names
  (``DIR/<label>/<image>``; images directly in DIR have no label), and each image's metadata
  records its path relative to DIR. Images go through exactly the service's path: the same safe
  decoding and evaluation transform (:mod:`service.preprocess`) and the same
  :class:`service.runtime.OnnxModel`, so the gallery holds what POSTing the images to /index gives.
  Unreadable images are skipped and counted.
- ``--embeddings DIR``: the Parquet dataset written by ``dino embed`` is loaded as it is, without
  recomputing anything: its ids, labels and paths become the gallery's ids, labels and metadata.
  It must have been made by the same model (its ``_embed.json`` names the model's sha256). With
  ``--images`` too, the stored images (``GET /index/{id}/image``) are made from the files; without,
  the entries have none. Rows whose id is already in the gallery are skipped, so an interrupted
  import resumes with ``--append``.

Two targets, as in ``dino serve``: a FAISS index folder (``--output``, serve it with
``dino serve --index``), or a Milvus collection (``--gallery milvus --milvus-uri ...``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import ValidationError
from tqdm import tqdm

from dino.images import IMAGE_EXTENSIONS, ImageInputError, label_of, list_image_files
from service.gallery import MANIFEST_FILE, Gallery, GalleryError
from service.gallery.factory import open_faiss_index, open_milvus_gallery
from service.preprocess import PreparedImage, Preprocessor, make_thumbnail
from service.runtime import ModelLoadError, OnnxModel
from service.settings import ModelNotFoundError, ServiceSettings
from service.state import embed_tensors

if TYPE_CHECKING:
    from service.batch_embedding import StoredEmbeddings

log = logging.getLogger(__name__)

#: rows of a Parquet dataset per gallery add: large enough for few round trips to Milvus, small
#: enough that a batch with its stored images stays far below Milvus's 64 MB message limit
IMPORT_BATCH_ROWS = 1024


@dataclass(frozen=True)
class IndexBuildResult:
    """What one ``dino index build`` did."""

    added: int  #: images embedded (or embeddings loaded) and stored
    skipped: int  #: unreadable images, logged and left out
    size: int  #: images in the gallery afterwards (more than ``added`` with ``--append``)
    seconds: float
    already_there: int = 0  #: rows of an --embeddings dataset whose id the gallery already held


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = commands.add_parser(
        "build", help="fill a gallery from an image folder, or from the Parquet output of dino embed"
    )
    build.add_argument("--model", help="model folder (default: DINO_MODEL_DIR, else the first folder of models/)")
    build.add_argument(
        "--images",
        help="image folder; labels from subfolder names (DIR/<label>/<image>). With --embeddings: where the "
        "stored images are made from",
    )
    build.add_argument(
        "--embeddings", help="output folder of 'dino embed' (same model): load its embeddings instead of computing"
    )
    build.add_argument(
        "--gallery", choices=["faiss", "milvus"], default=None, help="target backend (default: DINO_GALLERY or faiss)"
    )
    build.add_argument("--output", help="faiss: index folder to create (serve it with 'dino serve --index')")
    build.add_argument(
        "--milvus-uri", default=None, help="milvus: http://HOST:19530 or PATH.db (default: DINO_MILVUS_URI)"
    )
    build.add_argument("--milvus-collection", default=None, help="milvus: collection (default: one per model)")
    build.add_argument("--append", action="store_true", help="add to a gallery that already holds images")
    build.add_argument("--batch-size", type=int, default=32, help="images per inference call (default 32)")
    build.add_argument("--threads", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="decoding threads")
    build.add_argument("--index-type", choices=["flat", "hnsw"], default=None, help="default: DINO_INDEX_TYPE or flat")
    build.add_argument(
        "--provider", choices=["auto", "cpu", "cuda"], default=None, help="default: DINO_PROVIDER or auto"
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def open_target(
    settings: ServiceSettings, model: OnnxModel, output: Path | None, *, append: bool, expected: int
) -> Gallery:
    """The gallery to fill: the FAISS folder ``output`` or the settings' Milvus collection; refuses one
    that already holds images unless ``append``."""
    if settings.gallery == "milvus":
        gallery = open_milvus_gallery(settings, model, read_only=False)
        where = f"Milvus collection {getattr(gallery, 'collection', '?')}"
    else:
        if output is None:
            raise GalleryError("--output INDEX_FOLDER is needed for a faiss gallery (or pass --gallery milvus)")
        if (output / MANIFEST_FILE).exists() and not append:
            raise GalleryError(
                f"{output} already holds a gallery index; pass --append to add to it, or choose a new folder"
            )
        # one snapshot at the end rather than many while building
        compact_every = max(settings.index_compact_every, expected + 1)
        gallery = open_faiss_index(settings, model, output, read_only=False, compact_every=compact_every)
        where = str(output)
    held = int(gallery.info()["size"])
    if held and not append:
        gallery.close()
        raise GalleryError(f"{where} already holds {held} images; pass --append to add to them")
    return gallery


@dataclass(frozen=True)
class GalleryImage:
    """An image file made ready for the gallery: the model input and the stored JPEG, or why not."""

    prepared: PreparedImage | None
    stored: bytes | None
    reason: str = ""


def _gallery_image_reader(model: OnnxModel, settings: ServiceSettings) -> Callable[[Path], GalleryImage]:
    """A function that reads one image file the way the service reads an upload."""
    preprocessor = Preprocessor.for_model(model.spec, settings.max_image_pixels, settings.max_jpeg_scans)

    def read(path: Path) -> GalleryImage:
        try:
            prepared = preprocessor.prepare(path.read_bytes())
        except (ImageInputError, OSError) as exc:
            return GalleryImage(None, None, str(getattr(exc, "detail", None) or exc))
        stored = make_thumbnail(prepared.crop, settings.thumbnail_size, settings.thumbnail_quality)
        return GalleryImage(prepared, stored)

    return read


def add_images(
    gallery: Gallery,
    model: OnnxModel,
    images_dir: Path,
    settings: ServiceSettings,
    *,
    batch_size: int = 32,
    threads: int = 4,
    progress: bool = True,
) -> tuple[int, int]:
    """Embed every image below ``images_dir`` into ``gallery``; returns (added, skipped)."""
    files = list_image_files(images_dir)
    read = _gallery_image_reader(model, settings)
    added = skipped = 0
    with (
        ThreadPoolExecutor(max_workers=threads) as pool,
        tqdm(total=len(files), unit="img", desc="indexing", disable=not progress) as bar,
    ):
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            good: list[tuple[Path, PreparedImage, bytes]] = []
            for path, image in zip(chunk, pool.map(read, chunk), strict=True):
                if image.prepared is None or image.stored is None:
                    log.warning("skipping %s: %s", path, image.reason)
                else:
                    good.append((path, image.prepared, image.stored))
            skipped += len(chunk) - len(good)
            if good:
                tensors = np.stack([prepared.tensor for _, prepared, _ in good])
                gallery.add(
                    embed_tensors(model, tensors),
                    [label_of(path, images_dir) for path, _, _ in good],
                    [{"path": path.relative_to(images_dir).as_posix()} for path, _, _ in good],
                    [stored for _, _, stored in good],
                )
                added += len(good)
            bar.update(len(chunk))
    return added, skipped


def add_embeddings(
    gallery: Gallery,
    model: OnnxModel,
    dataset: StoredEmbeddings,
    settings: ServiceSettings,
    *,
    images_dir: Path | None = None,
    threads: int = 4,
    progress: bool = True,
) -> tuple[int, int]:
    """Load the rows of a ``dino embed`` dataset into ``gallery`` (stored images made from
    ``images_dir`` when given); returns (added, already there)."""
    taken = set(gallery.ids()) if gallery.size else set()
    read = _gallery_image_reader(model, settings) if images_dir is not None else None
    added = already = no_image = 0
    with (
        ThreadPoolExecutor(max_workers=threads) as pool,
        tqdm(total=dataset.num_rows, unit="row", desc="loading", disable=not progress) as bar,
    ):
        for rows in dataset.batches(IMPORT_BATCH_ROWS):
            keep = [i for i, image_id in enumerate(rows.ids) if image_id not in taken]
            already += len(rows.ids) - len(keep)
            images: list[bytes | None] = [None] * len(keep)
            if read is not None and images_dir is not None:
                images = [image.stored for image in pool.map(read, [images_dir / rows.paths[i] for i in keep])]
            # the stores take a batch with an image for every entry, or for none
            for with_image in (True, False):
                part = [j for j, image in enumerate(images) if (image is not None) == with_image]
                if not part:
                    continue
                chosen = [keep[j] for j in part]
                try:
                    gallery.add(
                        rows.embeddings[chosen],
                        [rows.labels[i] for i in chosen],
                        [{"path": rows.paths[i]} for i in chosen],
                        [image for image in (images[j] for j in part) if image is not None] if with_image else None,
                        ids=[rows.ids[i] for i in chosen],
                    )
                except ValueError as exc:  # NaN embeddings, malformed ids: the dataset was altered
                    raise GalleryError(f"{dataset.path}: {exc}") from exc
                taken.update(rows.ids[i] for i in chosen)
                if not with_image:
                    no_image += len(chosen)
            added += len(keep)
            bar.update(len(rows.ids))
    if read is not None and no_image:
        log.warning(
            "%d entries have no stored image: their files below %s are missing or unreadable",
            no_image,
            images_dir,
        )
    return added, already


def check_same_model(dataset: StoredEmbeddings, model: OnnxModel) -> None:
    """Refuse embeddings made by another model: in the gallery they would not be comparable to queries."""
    if dataset.model_sha256 != model.sha256:
        raise GalleryError(
            f"{dataset.path} holds embeddings of model {dataset.model_name!r} (sha256 {dataset.model_sha256[:12]}...), "
            f"not of {model.name!r} ({model.sha256[:12]}...): pass --model with the model that made them"
        )


def build_index(
    model: OnnxModel,
    settings: ServiceSettings,
    *,
    images_dir: Path | None = None,
    embeddings: Path | None = None,
    output: Path | None = None,
    batch_size: int = 32,
    threads: int = 4,
    append: bool = False,
    progress: bool = True,
) -> IndexBuildResult:
    """Fill the gallery (``output`` folder, or the settings' Milvus collection) from ``images_dir`` or
    from the ``dino embed`` dataset ``embeddings``; returns counts."""
    if images_dir is not None and not images_dir.is_dir():
        raise GalleryError(f"image folder {images_dir} does not exist")
    dataset = None
    if embeddings is not None:
        dataset = _read_embeddings(embeddings)
        check_same_model(dataset, model)
        expected = dataset.num_rows
    else:
        if images_dir is None:
            raise GalleryError("give --images DIR, or --embeddings DIR (the output of dino embed)")
        expected = len(list_image_files(images_dir))
        if not expected:
            raise GalleryError(f"no images in {images_dir} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    started = time.perf_counter()
    gallery = open_target(settings, model, output, append=append, expected=expected)
    already = 0
    try:
        if dataset is not None:
            added, already = add_embeddings(
                gallery, model, dataset, settings, images_dir=images_dir, threads=threads, progress=progress
            )
            skipped = 0
        else:
            assert images_dir is not None
            added, skipped = add_images(
                gallery, model, images_dir, settings, batch_size=batch_size, threads=threads, progress=progress
            )
        compact = getattr(gallery, "compact", None)
        if compact is not None:
            compact()
        size = int(gallery.info()["size"])  # counted now: a Milvus gallery's size property is the last count seen
    finally:
        gallery.close()
    return IndexBuildResult(
        added=added, skipped=skipped, size=size, seconds=time.perf_counter() - started, already_there=already
    )


def _read_embeddings(path: Path) -> StoredEmbeddings:
    try:
        from service.batch_embedding import EmbedError, StoredEmbeddings
    except ImportError as exc:  # pyarrow is in the embed extra
        raise GalleryError(f"reading Parquet needs pyarrow: pip install 'dino-platform[serve,embed]' ({exc})") from exc
    if not path.is_dir():
        raise GalleryError(f"{path} is not a folder (--embeddings takes the output folder of dino embed)")
    try:
        return StoredEmbeddings(path)
    except EmbedError as exc:
        raise GalleryError(str(exc)) from exc


def main(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {
        "model_dir": args.model,
        "index_type": args.index_type,
        "provider": args.provider,
        "gallery": args.gallery,
        "milvus_uri": args.milvus_uri,
        "milvus_collection": args.milvus_collection,
    }
    if args.images is None and args.embeddings is None:
        print("dino index build: give --images DIR, or --embeddings DIR (the output of dino embed)", file=sys.stderr)
        return 2
    try:
        settings = ServiceSettings(**{k: v for k, v in overrides.items() if v is not None})
        if settings.gallery == "milvus" and args.output:
            raise GalleryError("--output is the folder of a faiss gallery; a milvus gallery lives at --milvus-uri")
        model = OnnxModel.from_settings(settings)
        result = build_index(
            model,
            settings,
            images_dir=Path(args.images) if args.images else None,
            embeddings=Path(args.embeddings) if args.embeddings else None,
            output=Path(args.output) if args.output else None,
            batch_size=max(1, args.batch_size),
            threads=max(1, args.threads),
            append=args.append,
            progress=not args.no_progress,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"dino index build: {first['msg']} ({'.'.join(map(str, first['loc'])) or 'settings'})", file=sys.stderr)
        return 1
    except (ModelNotFoundError, ModelLoadError, GalleryError) as exc:
        print(f"dino index build: {exc}", file=sys.stderr)
        return 1
    target = args.output if settings.gallery == "faiss" else f"Milvus at {settings.milvus_uri}"
    if args.embeddings:
        done = f"loaded {result.added} embeddings ({result.already_there} already in the gallery)"
    else:
        done = f"indexed {result.added} images ({result.skipped} skipped)"
    print(f"{done} into {target} in {result.seconds:.1f} s; the gallery holds {result.size} images")
    return 0
