"""``dino index build``: embed a folder of images into a gallery index folder, offline.

Labels come from the subfolder names (``DIR/<label>/<image>``; images directly in DIR have no
label), and each image's metadata records its path relative to DIR. Images go through exactly the
service's path: the same safe decoding and evaluation transform (:mod:`service.preprocess`), the
same :class:`service.runtime.OnnxModel` and the same durable FAISS gallery
(:class:`service.gallery.EmbeddingIndex`), so ``dino serve --index OUTPUT`` serves the result as if
the images had been POSTed to /index.
Unreadable images are skipped and counted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dino.images import IMAGE_EXTENSIONS, ImageInputError, list_image_files
from service.gallery import MANIFEST_FILE, GalleryError
from service.gallery.factory import open_faiss_index
from service.preprocess import Preprocessor, make_thumbnail
from service.runtime import ModelLoadError, OnnxModel
from service.settings import ModelNotFoundError, ServiceSettings
from service.state import embed_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexBuildResult:
    """What one ``dino index build`` did."""

    added: int  #: images embedded and stored
    skipped: int  #: unreadable images, logged and left out
    size: int  #: images in the gallery afterwards (more than ``added`` with ``--append``)
    seconds: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = commands.add_parser("build", help="embed an image folder into a gallery index folder")
    build.add_argument("--model", help="model folder (default: DINO_MODEL_DIR, else the first folder of models/)")
    build.add_argument(
        "--images", required=True, help="image folder; labels from subfolder names (DIR/<label>/<image>)"
    )
    build.add_argument("--output", required=True, help="index folder to create (serve it with 'dino serve --index')")
    build.add_argument("--append", action="store_true", help="add to an existing index folder instead of refusing it")
    build.add_argument("--batch-size", type=int, default=32, help="images per inference call (default 32)")
    build.add_argument("--threads", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="decoding threads")
    build.add_argument("--index-type", choices=["flat", "hnsw"], default=None, help="default: DINO_INDEX_TYPE or flat")
    build.add_argument(
        "--provider", choices=["auto", "cpu", "cuda"], default=None, help="default: DINO_PROVIDER or auto"
    )


def label_of(path: Path, root: Path) -> str | None:
    """The subfolder path of an image relative to the root ("cat", "train/cat"); None at the top level."""
    parent = path.parent.relative_to(root)
    return None if parent == Path(".") else parent.as_posix()


def build_index(
    model: OnnxModel,
    images_dir: Path,
    output: Path,
    settings: ServiceSettings,
    *,
    batch_size: int = 32,
    threads: int = 4,
    append: bool = False,
    progress: bool = True,
) -> IndexBuildResult:
    """Embed every image below ``images_dir`` into the index folder ``output``; returns counts."""
    if not images_dir.is_dir():
        raise GalleryError(f"image folder {images_dir} does not exist")
    files = list_image_files(images_dir)
    if not files:
        raise GalleryError(f"no images in {images_dir} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if (output / MANIFEST_FILE).exists() and not append:
        raise GalleryError(
            f"{output} already holds a gallery index; pass --append to add to it, or choose a new folder"
        )
    index = open_faiss_index(
        settings,
        model,
        output,
        read_only=False,
        # one snapshot at the end rather than many while building
        compact_every=max(settings.index_compact_every, len(files) + 1),
    )
    preprocessor = Preprocessor.for_model(model.spec, settings.max_image_pixels, settings.max_jpeg_scans)

    def prepare(path: Path):
        try:
            prepared = preprocessor.prepare(path.read_bytes())
        except (ImageInputError, OSError) as exc:
            return path, None, str(getattr(exc, "detail", exc))
        return path, prepared, make_thumbnail(prepared.crop, settings.thumbnail_size, settings.thumbnail_quality)

    added = skipped = 0
    started = time.perf_counter()
    try:
        with (
            ThreadPoolExecutor(max_workers=threads) as pool,
            tqdm(total=len(files), unit="img", desc="indexing", disable=not progress) as bar,
        ):
            for start in range(0, len(files), batch_size):
                batch = list(pool.map(prepare, files[start : start + batch_size]))
                good = [(path, prepared, thumb) for path, prepared, thumb in batch if prepared is not None]
                for path, _, reason in (b for b in batch if b[1] is None):
                    log.warning("skipping %s: %s", path, reason)
                skipped += len(batch) - len(good)
                if good:
                    tensors = np.stack([prepared.tensor for _, prepared, _ in good])
                    embeddings = embed_tensors(model, tensors)
                    index.add(
                        embeddings,
                        [label_of(path, images_dir) for path, _, _ in good],
                        [{"path": path.relative_to(images_dir).as_posix()} for path, _, _ in good],
                        [thumb for _, _, thumb in good],
                    )
                    added += len(good)
                bar.update(len(batch))
        index.compact()
        size = index.size
    finally:
        index.close()
    return IndexBuildResult(added=added, skipped=skipped, size=size, seconds=time.perf_counter() - started)


def main(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"model_dir": args.model, "index_type": args.index_type, "provider": args.provider}
    try:
        settings = ServiceSettings(**{k: v for k, v in overrides.items() if v is not None})
        model = OnnxModel(
            settings.resolved_model_dir(),
            provider=settings.provider,
            use_fp16=settings.use_fp16,
            verify_sha256=settings.verify_sha256,
            intra_op_threads=settings.intra_op_threads,
        )
        result = build_index(
            model,
            Path(args.images),
            Path(args.output),
            settings,
            batch_size=max(1, args.batch_size),
            threads=max(1, args.threads),
            append=args.append,
        )
    except (ModelNotFoundError, ModelLoadError, GalleryError) as exc:
        print(f"dino index build: {exc}", file=sys.stderr)
        return 1
    print(
        f"indexed {result.added} images ({result.skipped} skipped) into {args.output} "
        f"in {result.seconds:.1f} s; the gallery holds {result.size} images"
    )
    return 0
