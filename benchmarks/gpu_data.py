"""Pack the images that ``benchmarks/gpu_check.py`` needs into one archive small enough to travel.

The GPU machine cannot download anything and receives only a copy of this repository's working tree
(64 MiB in all, tracked files included), so the real data folder (``$DINO_DATA_DIR``, default
``../shared/data``; never copied into the repository) has to come along in a reduced form:

- ``imagenette/train`` and ``imagenette/val``: a fixed per-class subset, re-encoded as small JPEGs
  (shorter side 144 px, quality 80). Class subfolders are kept, because the k-NN evaluation needs
  labels; training ignores them. The defaults (360 + 140 per class, 5,000 photos) come to about
  27 MiB: Imagenette's 224 px photos average ~12 KB, at 144 px / q80 ~5.3 KB.
- ``imagenet-sample``: the 14 photos that ``training/imagenet_sample_boxes.json`` draws boxes on,
  under their own names (the attention-box score and the attention grid read them), shorter side at
  most 288 px so that the 256 px resize of a 224 px model does not upscale them. Box coordinates are
  fractions of the photo, so they survive the resize.

Training at 224 px from 144 px photos upsamples every global crop: fine for a throughput and
plumbing check, not for a model to keep.

The photos are stored in one uncompressed zip, ``images.zip`` (JPEGs do not compress), which the
check unpacks into its work folder: thousands of 5 KB files would cost a third more as 4 KiB disk
blocks or tar headers, whichever way the 64 MiB are counted. ``MANIFEST.json`` beside it records what
was packed and the archive's size. The folder is git-ignored (ImageNet-derived images: never commit
them); the device tool takes it along with ``carry: ["benchmarks/gpu_check_data"]``.

    .venv/bin/python benchmarks/gpu_data.py                      # -> benchmarks/gpu_check_data/ (refuses > 30 MiB)
    .venv/bin/python benchmarks/gpu_data.py --train-per-class 2 --val-per-class 1 --output /tmp/tiny
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import random
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dino.data_dir import data_dir  # noqa: E402
from dino.images import list_image_files  # noqa: E402

DEFAULT_OUTPUT = REPO / "benchmarks" / "gpu_check_data"
BOXES_FILE = REPO / "training" / "imagenet_sample_boxes.json"
MANIFEST = "MANIFEST.json"
ARCHIVE = "images.zip"
#: the working tree travels with at most 64 MiB; the repository's tracked files take ~27 MB of it
DEFAULT_MAX_MIB = 30.0
SEED = 0


def _encode(image: Image.Image, side: int, quality: int) -> bytes:
    """JPEG bytes of ``image`` with its shorter side reduced to ``side`` (never enlarged)."""
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    width, height = image.size
    scale = side / min(width, height)
    if scale < 1:
        image = image.resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def _write(source: Path, target: Path, side: int, quality: int) -> int:
    with Image.open(source) as image:
        image.load()
        data = _encode(image if image.mode == "L" else image.convert("RGB"), side, quality)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return len(data)


def pack_split(source: Path, target: Path, per_class: int, side: int, quality: int) -> dict:
    """``per_class`` photos of each class folder of ``source`` (a seeded, reproducible choice) into
    ``target/<class>/``. Returns the counts and bytes."""
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"gpu_data: {source} has no class folders (expected <split>/<class>/<image>)")
    images = total = 0
    for folder in classes:
        files = list_image_files(folder)
        random.Random(f"{SEED}-{folder.name}").shuffle(files)
        for path in files[:per_class]:
            total += _write(path, target / folder.name / path.name, side, quality)
            images += 1
    return {"images": images, "classes": len(classes), "bytes": total}


def pack_sample_photos(source: Path, target: Path, side: int, quality: int) -> dict:
    """The boxed ImageNet sample photos (``training/imagenet_sample_boxes.json``), names kept."""
    names = list(json.loads(BOXES_FILE.read_text())["boxes"])
    total = 0
    for name in names:
        path = source / name
        if not path.is_file():
            raise SystemExit(f"gpu_data: {path} is missing (a photo of {BOXES_FILE.name})")
        total += _write(path, target / name, side, quality)
    return {"images": len(names), "bytes": total}


def pack(
    source: Path,
    output: Path,
    *,
    train_per_class: int = 360,
    val_per_class: int = 140,
    side: int = 144,
    quality: int = 80,
    sample_side: int = 288,
    sample_quality: int = 90,
) -> dict:
    """Rebuild ``output`` (``images.zip`` + ``MANIFEST.json``) from the data folder ``source``; returns
    the manifest. An existing ``output`` is replaced only when it holds a manifest (made by this script).
    """
    if output.exists():
        if any(output.iterdir()) and not (output / MANIFEST).is_file():
            raise SystemExit(
                f"gpu_data: {output} exists and was not made by this script (no {MANIFEST}); not touching it"
            )
        shutil.rmtree(output)
    for needed in ("imagenette/train", "imagenette/val", "imagenet-sample"):
        if not (source / needed).is_dir():
            raise SystemExit(f"gpu_data: {source / needed} is missing (set DINO_DATA_DIR or --source)")
    output.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=output, prefix=".staging-") as tmp:
        staging = Path(tmp)
        splits = {
            "imagenette/train": pack_split(
                source / "imagenette" / "train", staging / "imagenette" / "train", train_per_class, side, quality
            ),
            "imagenette/val": pack_split(
                source / "imagenette" / "val", staging / "imagenette" / "val", val_per_class, side, quality
            ),
            "imagenet-sample": pack_sample_photos(
                source / "imagenet-sample", staging / "imagenet-sample", sample_side, sample_quality
            ),
        }
        with zipfile.ZipFile(output / ARCHIVE, "w", zipfile.ZIP_STORED) as archive:
            for path in sorted(staging.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(staging).as_posix())
    size = (output / ARCHIVE).stat().st_size
    manifest = {
        "archive": ARCHIVE,
        "source": str(source),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seed": SEED,
        "imagenette": {"shorter_side": side, "jpeg_quality": quality},
        "imagenet_sample": {"max_shorter_side": sample_side, "jpeg_quality": sample_quality},
        "splits": splits,
        "images": sum(s["images"] for s in splits.values()),
        "bytes": size,
        "mib": round(size / 2**20, 2),
    }
    (output / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def unpack(folder: Path, target: Path) -> dict:
    """Extract ``folder/images.zip`` into ``target`` (``imagenette/{train,val}``, ``imagenet-sample``);
    returns the manifest."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file() or not (folder / ARCHIVE).is_file():
        raise FileNotFoundError(
            f"{folder} has no {ARCHIVE} + {MANIFEST}; make them with: python benchmarks/gpu_data.py --output {folder}"
        )
    with zipfile.ZipFile(folder / ARCHIVE) as archive:
        archive.extractall(target)
    return json.loads(manifest_path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source", type=Path, default=None, help="data folder (default: $DINO_DATA_DIR or ../shared/data)"
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT.relative_to(REPO)}"
    )
    parser.add_argument("--train-per-class", type=int, default=360)
    parser.add_argument("--val-per-class", type=int, default=140)
    parser.add_argument("--side", type=int, default=144, help="shorter side of the Imagenette photos, px")
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality of the Imagenette photos")
    parser.add_argument("--max-mib", type=float, default=DEFAULT_MAX_MIB, help="fail when the folder is larger")
    args = parser.parse_args(argv)
    source = args.source or data_dir()
    manifest = pack(
        source,
        args.output,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        side=args.side,
        quality=args.quality,
    )
    for name, split in manifest["splits"].items():
        print(f"{name:<18} {split['images']:>6} images  {split['bytes'] / 2**20:6.2f} MiB")
    print(f"{ARCHIVE:<18} {manifest['images']:>6} images  {manifest['mib']:6.2f} MiB  -> {args.output / ARCHIVE}")
    if manifest["mib"] > args.max_mib:
        print(
            f"gpu_data: {manifest['mib']} MiB is over --max-mib {args.max_mib}: the working tree would not travel "
            "(64 MiB in all); pack fewer or smaller photos",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
