"""DINO-paper-style attention figures from an exported model folder (ONNX Runtime, no PyTorch model).

    python -m training.visualize --model models/NAME --images a.jpg b.jpg --output docs/attention_grid.png

One row per photo: the centre crop the model sees, the mean-over-heads attention of [CLS] overlaid on
it, one heat map per head and, unless ``--threshold 0``, the photo masked to the patches that hold
60% of the mean attention mass (Caron et al. 2021, Fig. 3 / ``visualize_attention.py``: the smallest
set of patches whose attention sums to the threshold fraction).

Each map is shown at the patch resolution (nearest-neighbour upsampling), as in the paper.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dino.attention import mass_threshold_mask
from dino.model_folder import METADATA_FILE

DEFAULT_THRESHOLD = 0.6  #: fraction of attention mass kept by the mask column (DINO paper)
DEFAULT_CELL = 224  #: side in pixels of each cell of the grid
PAD = 4  #: pixels between cells
HEADER = 18  #: pixels of the column-label row
OVERLAY_ALPHA = 0.6  #: weight of the heat map over the photo in the mean-attention column
MASK_DIM = 0.25  #: brightness kept outside the thresholded region
COLORMAP = "inferno"
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)


class VisualizeError(Exception):
    """A user-facing failure: missing model folder or image."""


def _heat(values: np.ndarray, size: int) -> np.ndarray:
    """[h, w] map -> [size, size, 3] uint8 colour image, min-max scaled, nearest-upsampled."""
    from matplotlib import colormaps

    span = values.max() - values.min()
    scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    rgb = (colormaps[COLORMAP](scaled)[..., :3] * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.NEAREST))


def _upsample_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)) > 0


def read_model_metadata(model_dir: Path) -> dict:
    """The model.json of an exported model folder, as a dict."""
    meta_path = model_dir / METADATA_FILE
    if not meta_path.is_file():
        raise VisualizeError(f"{model_dir}: not a model folder (no {METADATA_FILE})")
    return json.loads(meta_path.read_text())


def load_model_folder(model_dir: Path):
    """(model.json as a dict, ONNX Runtime CPU session) of an exported model folder."""
    import onnxruntime as ort

    meta = read_model_metadata(model_dir)
    # a handful of images: the CPU provider is fast enough and needs no CUDA libraries
    session = ort.InferenceSession(str(model_dir / meta["file"]), providers=["CPUExecutionProvider"])
    return meta, session


def resize_size_for(meta: dict, image_size: int) -> int:
    """Shorter-side resize for a centre crop of ``image_size``, keeping the model's resize/crop ratio."""
    return round(meta["resize_size"] * image_size / meta["image_size"])


def preprocess_photo(path: Path, meta: dict, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(normalised [3, S, S] float32 input, [S, S, 3] uint8 crop for display) with the model's transform."""
    from training.augmentation import eval_transform

    if not path.is_file():
        raise VisualizeError(f"{path}: no such image")
    resize = resize_size_for(meta, image_size)
    with Image.open(path) as image:
        tensor = eval_transform(image_size, resize, meta["mean"], meta["std"])(image.convert("RGB"))
    x = tensor.numpy().astype(np.float32)
    mean, std = np.asarray(meta["mean"])[:, None, None], np.asarray(meta["std"])[:, None, None]
    display = np.clip((x * std + mean) * 255 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return x, display


def checked_image_size(meta: dict, image_size: int | None, model_dir: Path) -> int:
    """The input side to run at: ``image_size`` or the model's own, which must fit its patch size and,
    when it differs from the native size, a graph exported with dynamic H/W."""
    image_size = image_size or meta["image_size"]
    patch = meta["patch_size"]
    if image_size % patch or (image_size != meta["image_size"] and not meta.get("dynamic_hw")):
        raise VisualizeError(
            f"image size {image_size} is not supported by {model_dir} "
            f"(patch {patch}, dynamic H/W {meta.get('dynamic_hw')})"
        )
    return image_size


def photo_attention(session, meta: dict, path: Path, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """([heads, grid, grid] last-block [CLS] attention, [S, S, 3] uint8 crop) of one photo."""
    x, display = preprocess_photo(path, meta, image_size)
    grid = image_size // meta["patch_size"]
    attention = session.run(["attention"], {meta["input_name"]: x[None]})[0][0]
    return attention.reshape(meta["num_heads"], grid, grid), display


def attention_grid(
    model_dir: str | Path,
    images: list[str | Path],
    output: str | Path,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    cell: int = DEFAULT_CELL,
    image_size: int | None = None,
) -> Image.Image:
    """Draw the attention grid of ``images`` for the model in ``model_dir``, save it to ``output``, return it.

    Args:
        threshold: fraction of attention mass kept in the mask column; 0 leaves the column out.
        cell: side of each cell in pixels.
        image_size: input resolution (default: the model's native one); any multiple of the patch
            size works for models exported with dynamic H/W, and larger inputs give finer maps.
    """
    model_dir = Path(model_dir)
    meta, session = load_model_folder(model_dir)
    image_size = checked_image_size(meta, image_size, model_dir)
    heads = meta["num_heads"]
    labels = ["image", "mean attention"] + [f"head {h}" for h in range(heads)]
    if threshold > 0:
        labels.append(f"top {threshold:.0%} mass")
    columns = len(labels)
    canvas = Image.new(
        "RGB", (columns * cell + (columns + 1) * PAD, HEADER + len(images) * (cell + PAD) + PAD), BACKGROUND
    )
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(labels):
        draw.text((PAD + c * (cell + PAD), 2), label, fill=TEXT_COLOUR)

    for r, path in enumerate(images):
        attention, display = photo_attention(session, meta, Path(path), image_size)
        photo = np.asarray(Image.fromarray(display).resize((cell, cell), Image.Resampling.BICUBIC))
        mean = attention.mean(axis=0)
        tiles = [photo, (photo * (1 - OVERLAY_ALPHA) + _heat(mean, cell) * OVERLAY_ALPHA).astype(np.uint8)]
        tiles += [_heat(attention[h], cell) for h in range(heads)]
        if threshold > 0:
            keep = _upsample_mask(mass_threshold_mask(mean, threshold), cell)[..., None]
            tiles.append(np.where(keep, photo, photo * MASK_DIM).astype(np.uint8))
        top = HEADER + PAD + r * (cell + PAD)
        for c, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(tile), (PAD + c * (cell + PAD), top))

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(output)
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.visualize", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder written by 'dino export' / 'dino import'")
    parser.add_argument("--images", nargs="+", required=True, help="photos, one row each")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="attention mass kept by the mask column (0: no mask column)",
    )
    parser.add_argument("--cell", type=int, default=DEFAULT_CELL, help="cell side in pixels")
    parser.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
    args = parser.parse_args(argv)
    if not 0 <= args.threshold < 1:
        parser.error("--threshold must be in [0, 1)")
    try:
        grid = attention_grid(
            args.model, args.images, args.output, threshold=args.threshold, cell=args.cell, image_size=args.image_size
        )
    except VisualizeError as exc:
        print(f"visualize: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({grid.size[0]}x{grid.size[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
