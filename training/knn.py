"""Weighted k-NN evaluation of DINO (Caron et al. 2021, Sec. 4.1; after Wu et al. 2018).

Features: the teacher backbone's [CLS] embedding, L2-normalised, of the evaluation transform
(resize, centre crop). Each query votes with its k nearest gallery images (cosine similarity),
weighted by exp(similarity / T). Defaults k=20, T=0.07 as in the paper.

``dino knn --checkpoint RUN/checkpoint.pth --train DIR --val DIR`` prints top-1/top-5 and writes
JSON. ``--baseline random`` evaluates a randomly initialised network of the same architecture and
``--baseline pixels`` the raw (normalised) pixels, the two references a trained model must beat.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import TypedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from dino.images import IMAGE_EXTENSIONS, load_rgb
from training.augmentation import eval_transform
from training.backbone import build_backbone
from training.data import DataError
from training.distributed import DeviceError, resolve_device
from training.weights import WeightsError, load_checkpoint_teacher

log = logging.getLogger(__name__)

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
QUERY_CHUNK = 256  # queries per similarity matmul, bounds memory for large galleries


class KnnResult(TypedDict):
    """Accuracy of the weighted k-NN vote, in percent, and the protocol it was measured with."""

    top1: float
    top5: float
    k: int
    temperature: float
    n_train: int  #: gallery images
    n_val: int  #: query images


def _is_image(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def labelled_folder(root: str | Path, transform, max_images: int = 0) -> tuple[ImageFolder | Subset, list[str]]:
    """An ImageFolder (``root/<class>/<image>``), optionally capped evenly across classes."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"k-NN folder {str(root)!r} does not exist or is not a folder")
    try:
        dataset = ImageFolder(str(root), transform=transform, loader=load_rgb, is_valid_file=_is_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"k-NN folder {str(root)!r}: {exc} (expected ImageFolder layout root/<class>/<image>)") from exc
    if max_images and max_images < len(dataset):
        per_class = defaultdict(list)
        for i, target in enumerate(dataset.targets):
            per_class[target].append(i)
        quota = max(1, max_images // len(per_class))
        indices = sorted(i for idx in per_class.values() for i in idx[:quota])
        return Subset(dataset, indices), dataset.classes
    return dataset, dataset.classes


@torch.no_grad()
def extract_features(
    model: nn.Module | None, dataset, device: torch.device, batch_size: int = 128, num_workers: int = 2, desc: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features and labels of a labelled dataset; ``model=None`` uses raw pixels."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for images, targets in tqdm(loader, desc=desc or "features", leave=False, dynamic_ncols=True):
        images = images.to(device, non_blocking=True)
        out = images.flatten(1) if model is None else model(images)
        feats.append(F.normalize(out.float(), dim=1).cpu())
        labels.append(targets)
    return torch.cat(feats), torch.cat(labels)


def weighted_knn(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> KnnResult:
    """Top-1/top-5 accuracy (%) of the weighted k-NN vote; features must be L2-normalised."""
    k = min(k, train_features.shape[0])
    correct1 = correct5 = 0
    for start in range(0, test_features.shape[0], QUERY_CHUNK):
        queries = test_features[start : start + QUERY_CHUNK]
        targets = test_labels[start : start + QUERY_CHUNK]
        similarity, indices = (queries @ train_features.T).topk(k, dim=1)
        neighbour_labels = train_labels[indices]
        weights = (similarity / temperature).exp()
        votes = torch.zeros(queries.shape[0], num_classes).scatter_add_(1, neighbour_labels, weights)
        top = votes.topk(min(5, num_classes), dim=1).indices
        correct1 += int((top[:, 0] == targets).sum().item())
        correct5 += int((top == targets[:, None]).any(dim=1).sum().item())
    n = test_features.shape[0]
    return KnnResult(
        top1=100.0 * correct1 / n,
        top5=100.0 * correct5 / n,
        k=k,
        temperature=temperature,
        n_train=int(train_features.shape[0]),
        n_val=int(n),
    )


def evaluate_knn(
    backbone: nn.Module | None,
    train_dir: str | Path,
    val_dir: str | Path,
    image_size: int,
    device: torch.device,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    max_images: int = 0,
    batch_size: int = 128,
    num_workers: int = 2,
) -> KnnResult:
    """Full protocol: features of both splits, then the weighted vote. ``backbone=None``: pixels."""
    transform = eval_transform(image_size)
    train_set, classes = labelled_folder(train_dir, transform, max_images)
    val_set, val_classes = labelled_folder(val_dir, transform, max_images)
    if classes != val_classes:
        raise DataError(f"class folders differ between {train_dir} and {val_dir}")
    was_training = backbone.training if backbone is not None else False
    if backbone is not None:
        backbone.eval()
    try:
        train_f, train_y = extract_features(backbone, train_set, device, batch_size, num_workers, "k-NN gallery")
        val_f, val_y = extract_features(backbone, val_set, device, batch_size, num_workers, "k-NN queries")
    finally:
        if backbone is not None:
            backbone.train(was_training)
    return weighted_knn(train_f, train_y, val_f, val_y, len(classes), k, temperature)


# ---------------------------------------------------------------- command line: dino knn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="RUN/checkpoint.pth written by dino train")
    parser.add_argument("--train", required=True, help="labelled gallery folder (ImageFolder layout)")
    parser.add_argument("--val", required=True, help="labelled query folder (ImageFolder layout)")
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    parser.add_argument("--image-size", type=int, default=0, help="eval crop size (default: the run's global size)")
    parser.add_argument("--max-images", type=int, default=0, help="cap per split, evenly across classes (0: all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--baseline", choices=["random", "pixels"], help="evaluate a random-init network or raw pixels instead"
    )
    parser.add_argument("--arch", default="vit_tiny", help="with --baseline random and no checkpoint")
    parser.add_argument("--patch-size", type=int, default=16, help="with --baseline random and no checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="with --baseline random")
    parser.add_argument("--output", help="JSON result file (default: next to the checkpoint, or knn.json)")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    meta: dict = {}
    image_size = args.image_size
    backbone: nn.Module | None
    try:
        device = resolve_device(args.device)
        if args.baseline == "pixels":
            backbone = None
            meta["model"] = "raw pixels"
            image_size = image_size or 224
        elif args.checkpoint:
            path = Path(args.checkpoint)
            if not path.is_file():
                raise DataError(f"checkpoint {str(path)!r} not found")
            teacher, cfg, ckpt_meta = load_checkpoint_teacher(path)  # weights_only: no pickled code runs
            image_size = image_size or cfg["global_size"]
            if args.baseline == "random":
                torch.manual_seed(args.seed)
                backbone = build_backbone(cfg["arch"], cfg["patch_size"], cfg["global_size"])
            else:
                backbone = teacher
            meta.update(
                model="random init" if args.baseline else "teacher",
                checkpoint=str(path),
                epoch=ckpt_meta["epoch"],
                arch=cfg["arch"],
                patch_size=cfg["patch_size"],
            )
        elif args.baseline == "random":
            torch.manual_seed(args.seed)
            image_size = image_size or 224
            backbone = build_backbone(args.arch, args.patch_size, image_size)
            meta.update(model="random init", arch=args.arch, patch_size=args.patch_size)
        else:
            print("dino knn: give --checkpoint (or --baseline pixels / random)", file=sys.stderr)
            return 2
        if backbone is not None:
            backbone.to(device)
        start = time.time()
        knn = evaluate_knn(
            backbone,
            args.train,
            args.val,
            image_size,
            device,
            args.k,
            args.temperature,
            args.max_images,
            args.batch_size,
            args.num_workers,
        )
    except (DataError, DeviceError, WeightsError) as exc:
        print(f"dino knn: {exc}", file=sys.stderr)
        return 1
    record = {
        **knn,
        **meta,
        "image_size": image_size,
        "seconds": round(time.time() - start, 1),
        "train": str(args.train),
        "val": str(args.val),
    }
    print(
        f"k-NN ({meta.get('model')}, k={knn['k']}, T={knn['temperature']}, "
        f"{knn['n_train']} gallery / {knn['n_val']} queries): "
        f"top-1 {knn['top1']:.2f}%  top-5 {knn['top5']:.2f}%"
    )
    output = (
        Path(args.output)
        if args.output
        else (
            Path(args.checkpoint).with_name("knn.json") if args.checkpoint and not args.baseline else Path("knn.json")
        )
    )
    output.write_text(json.dumps(record, indent=2))
    print(f"wrote {output}")
    return 0
