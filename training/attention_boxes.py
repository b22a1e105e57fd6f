"""Does the [CLS] attention follow objects? A number for it: attention mass inside hand-drawn boxes.

    python -m training.attention_boxes --model models/NAME --random-baseline --output result.json

The DINO paper (Caron et al. 2021, Sec. 4.2.1 and Fig. 4) compares the patches that hold 60% of
the [CLS] attention mass with segmentation masks, by Jaccard similarity. ``../shared/data`` has no
masks, so this module uses boxes drawn by hand around the main object of 14 ImageNet photos
(``imagenet_sample_boxes.json``). Each photo goes through the model's own resize and centre crop,
and a patch belongs to the box when its centre lies inside it. Per model, three scores of the
mean-over-heads attention map are reported:

- **mass in box**: the share of the attention that lands on the box's patches;
- **lift**: that share divided by the box's share of the patches. 1.0 means the attention is
  spread evenly, above 1 it favours the object, below 1 it avoids it;
- **Jaccard**: the intersection-over-union of the top-60%-mass patches with the box's patches
  (the paper's measure, with boxes in place of masks).

The lift of each head is reported too: in the paper's figures, single heads pick out objects
or object parts while others look elsewhere, which the mean over heads can hide.

``--random-baseline`` also scores a randomly initialised network of the same architecture. A
random ViT already shows colour-driven silhouettes, so only a margin over it counts as learned.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dino.attention import mass_threshold_mask
from dino.data_dir import data_dir
from training.visualize import (
    DEFAULT_THRESHOLD,
    VisualizeError,
    checked_image_size,
    load_model_folder,
    photo_attention,
    read_model_metadata,
    resize_size_for,
)

DEFAULT_BOXES = Path(__file__).with_name("imagenet_sample_boxes.json")
#: the real data folder (``DINO_DATA_DIR``, default ``../shared/data`` beside the repository)
DATA_DIR = data_dir()
DEFAULT_IMAGES = DATA_DIR / "imagenet-sample"
RANDOM_SEED = 0  #: seed of the random-init baseline network
RANDOM_NAME = "random-init"


class BoxEvalError(Exception):
    """A user-facing failure: bad box file, missing photo, box outside the crop."""


@dataclass
class ImageScore:
    """Scores of one photo's mean attention map against its box."""

    box_area: float  #: share of the patch grid inside the box
    mass_in_box: float
    lift: float
    jaccard: float
    head_lift: list[float]  #: lift of each head's own map


def box_patch_mask(
    box: list[float], photo_size: tuple[int, int], image_size: int, resize_size: int, patch_size: int
) -> np.ndarray:
    """Boolean [grid, grid] mask of the patches whose centre lies in ``box`` once the photo is resized
    (shorter side to ``resize_size``) and centre-cropped to ``image_size``, as the model sees it.

    Args:
        box: [x0, y0, x1, y1] as fractions of the original photo's width and height.
        photo_size: (width, height) of the original photo.
    """
    width, height = photo_size
    scale = resize_size / min(width, height)
    resized_w, resized_h = width * scale, height * scale
    left, top = (resized_w - image_size) / 2, (resized_h - image_size) / 2
    x0, y0, x1, y1 = box
    centres = (np.arange(image_size // patch_size) + 0.5) * patch_size
    cols = (centres >= x0 * resized_w - left) & (centres <= x1 * resized_w - left)
    rows = (centres >= y0 * resized_h - top) & (centres <= y1 * resized_h - top)
    return rows[:, None] & cols[None, :]


def _mass_in(attention_map: np.ndarray, box_mask: np.ndarray) -> float:
    return float(attention_map[box_mask].sum() / attention_map.sum())


def score_map(attention: np.ndarray, box_mask: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> ImageScore:
    """Score one photo's [heads, grid, grid] attention (mean over heads) against a [grid, grid] box mask."""
    mean_map = attention.mean(axis=0)
    area = float(box_mask.mean())
    mass = _mass_in(mean_map, box_mask)
    kept = mass_threshold_mask(mean_map, threshold)
    jaccard = float((kept & box_mask).sum() / (kept | box_mask).sum())
    head_lift = [_mass_in(head_map, box_mask) / area for head_map in attention]
    return ImageScore(box_area=area, mass_in_box=mass, lift=mass / area, jaccard=jaccard, head_lift=head_lift)


def read_boxes(path: str | Path) -> dict[str, list[float]]:
    """Photo file name -> [x0, y0, x1, y1]; refuses boxes that are not inside [0, 1] with x0 < x1, y0 < y1."""
    try:
        boxes = json.loads(Path(path).read_text())["boxes"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BoxEvalError(f"{path}: cannot read a box file ({exc}); expected JSON with a 'boxes' object") from exc
    if not isinstance(boxes, dict) or not boxes:
        raise BoxEvalError(f"{path}: 'boxes' must map photo file names to [x0, y0, x1, y1]")
    for name, box in boxes.items():
        ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
        if not ok or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            raise BoxEvalError(
                f"{path}: box of {name} is {box}; expected [x0, y0, x1, y1] fractions with x0 < x1 and y0 < y1"
            )
    return boxes


def evaluate_model(
    model_dir: str | Path, boxes: dict[str, list[float]], images_dir: Path, image_size: int | None = None
) -> dict:
    """Score every boxed photo with the exported model in ``model_dir`` (ONNX Runtime, CPU).

    Returns ``{"image_size", "per_image": {name: ImageScore as dict}, "mean": {score: value}}``.
    Raises BoxEvalError, or VisualizeError for an unusable model folder or image size.
    """
    model_dir = Path(model_dir)
    meta, session = load_model_folder(model_dir)
    image_size = checked_image_size(meta, image_size, model_dir)
    per_image: dict[str, ImageScore] = {}
    for name, box in boxes.items():
        path = images_dir / name
        if not path.is_file():
            raise BoxEvalError(f"{path}: no such photo (set --images-dir)")
        with Image.open(path) as photo:
            photo_size = photo.size
        mask = box_patch_mask(box, photo_size, image_size, resize_size_for(meta, image_size), meta["patch_size"])
        if not mask.any():
            raise BoxEvalError(f"{name}: the box {box} falls outside the centre crop")
        attention, _ = photo_attention(session, meta, path, image_size)
        per_image[name] = score_map(attention, mask)
    scores = list(per_image.values())
    fields = ("box_area", "mass_in_box", "lift", "jaccard")
    mean: dict[str, Any] = {f: float(np.mean([getattr(s, f) for s in scores])) for f in fields}
    mean["head_lift"] = [float(v) for v in np.mean([s.head_lift for s in scores], axis=0)]
    return {"image_size": image_size, "per_image": {k: asdict(v) for k, v in per_image.items()}, "mean": mean}


def export_random_baseline(meta: dict, output_dir: Path) -> Path:
    """Export a randomly initialised backbone with the architecture of ``meta`` (a model.json) into ``output_dir``."""
    import torch

    from training.backbone import build_backbone
    from training.export import export_backbone

    torch.manual_seed(RANDOM_SEED)
    backbone = build_backbone(meta["arch"], meta["patch_size"], meta["image_size"])
    export_backbone(
        backbone,
        output_dir,
        name=RANDOM_NAME,
        arch=meta["arch"],
        patch_size=meta["patch_size"],
        image_size=meta["image_size"],
        resize_size=meta["resize_size"],
        mean=meta["mean"],
        std=meta["std"],
        provenance={"source": f"build_backbone with torch.manual_seed({RANDOM_SEED})"},
    )
    return output_dir


def print_table(results: dict[str, dict]) -> None:
    """One row per photo (box area, then mass in box / Jaccard per model), then the means."""
    names = list(results)
    photos = list(next(iter(results.values()))["per_image"])
    header = f"{'photo':<32}{'box area':>9}" + "".join(f"{n[:28]:>30}" for n in names)
    print(header)
    print(f"{'':<41}" + "".join(f"{'mass in box / Jaccard':>30}" for _ in names))
    for photo in photos:
        area = results[names[0]]["per_image"][photo]["box_area"]
        cells = "".join(
            f"{r['per_image'][photo]['mass_in_box']:>20.3f} / {r['per_image'][photo]['jaccard']:.3f}"
            for r in results.values()
        )
        print(f"{photo.removesuffix('.JPEG')[:31]:<32}{area:>9.3f}{cells}")
    for score in ("mass_in_box", "lift", "jaccard"):
        print(f"{'mean ' + score:<41}" + "".join(f"{r['mean'][score]:>30.3f}" for r in results.values()))
    print(
        f"{'mean lift of each head':<41}"
        + "".join(f"{' '.join(f'{v:.2f}' for v in r['mean']['head_lift']):>30}" for r in results.values())
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.attention_boxes", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="model folder (repeat to compare models)")
    parser.add_argument(
        "--random-baseline",
        action="store_true",
        help="also score a random-init network of the first model's architecture",
    )
    parser.add_argument(
        "--boxes", default=str(DEFAULT_BOXES), help="box file (default: the 14 hand-drawn ImageNet-sample boxes)"
    )
    parser.add_argument("--images-dir", default=str(DEFAULT_IMAGES), help="folder of the boxed photos")
    parser.add_argument("--image-size", type=int, default=None, help="input resolution (default: each model's own)")
    parser.add_argument("--output", default=None, help="JSON file for the scores")
    args = parser.parse_args(argv)
    try:
        boxes = read_boxes(args.boxes)
        images_dir = Path(args.images_dir)
        results = {}
        for model in args.model:
            results[Path(model).name] = evaluate_model(model, boxes, images_dir, args.image_size)
        if args.random_baseline:
            with tempfile.TemporaryDirectory() as tmp:
                baseline = export_random_baseline(read_model_metadata(Path(args.model[0])), Path(tmp) / RANDOM_NAME)
                results[RANDOM_NAME] = evaluate_model(baseline, boxes, images_dir, args.image_size)
    except (BoxEvalError, VisualizeError) as exc:
        print(f"attention_boxes: {exc}", file=sys.stderr)
        return 1
    print_table(results)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(
            json.dumps({"boxes": str(args.boxes), "threshold": DEFAULT_THRESHOLD, "models": results}, indent=2)
        )
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
