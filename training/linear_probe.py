"""Linear evaluation of DINO: a linear classifier trained on frozen features (Caron et al. 2021,
Sec. 4.1 "Linear and k-NN classification on ImageNet" and the evaluation details of its appendix;
the reference implementation is ``eval_linear.py`` of facebookresearch/dino).

The protocol
------------

- **Features** (frozen; the reference's ``n_last_blocks`` and ``avgpool_patchtokens``): the [CLS]
  token after the final LayerNorm of each of the last ``n`` blocks, concatenated, optionally followed
  by the average of the last block's (normalised) patch tokens. The reference's defaults per size,
  used here unless ``--n-last-blocks`` / ``--avgpool`` say otherwise: ViT-Small (and so ViT-Tiny)
  4 blocks without the patch average, ViT-Base the last block with it (:data:`PAPER_FEATURES`).
- **An exported ONNX model** (``--model``) exposes only the last block: its ``embedding`` (that
  block's [CLS] after the final norm) and its ``patch_tokens``. There the default is the ViT-Base
  recipe, last [CLS] + average patch token, and the JSON says so; more blocks are refused.
- **Classifier**: one ``nn.Linear`` on the concatenated features, no normalisation of any kind (the
  reference's ``LinearClassifier``: weights N(0, 0.01), bias 0), cross-entropy.
- **Optimiser**: SGD, momentum 0.9, weight decay 0, learning rate ``--lr`` per 256 images scaled
  linearly with the batch, cosine-annealed to 0 over the probe's epochs (stepped once per epoch).
- **Augmentation**: the paper's light one, RandomResizedCrop + horizontal flip, for training; resize
  (ratio 8/7) + centre crop for validation, which is where top-1/top-5 are measured. The score is the
  last epoch's, not the best epoch's (the reference prints the maximum over epochs, which picks an
  epoch on the validation set).

What differs from the reference, and why
----------------------------------------

The reference runs the frozen backbone on a fresh augmentation of every image in every epoch: 100
forward passes per image, which is the whole cost of the probe, and a GPU's worth. Here the features
are computed once and cached to disk next to the output (``OUTPUT.val.npz``, ``OUTPUT.train.npz``,
float16): the validation centre crops, and ``--aug-views N`` augmented views per training image
(``0``: the training centre crop only). Each epoch then draws one of the cached views per image, so
an epoch costs a pass of a linear layer over cached vectors, seconds on a CPU, and the backbone runs
``N + 1`` times per image in all instead of 100. The augmentation is thereby restricted to ``N``
views; with ``N = 0`` there is none.

Resuming: the caches are reused when their key (source weights, features, image size, views, seed,
and the listing of the image folders) matches, and the probe's state is saved after every epoch in
``OUTPUT.probe.pt``; rerunning the same command continues from the last finished epoch. Each epoch's
draws come from a generator seeded by (seed, epoch), so a resumed run ends with the same classifier
as an uninterrupted one.

``dino linear --checkpoint RUN/checkpoint.pth | --model models/NAME --train DIR --val DIR --output
result.json``; ``--baseline random`` (same architecture, random initialisation) and ``--baseline
pixels`` (the normalised pixels of the same crops) are the references a trained model must beat,
as for ``dino knn``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from dino.images import IMAGE_EXTENSIONS, ImageInputError, load_rgb
from dino.model_folder import METADATA_FILE
from training.augmentation import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from training.backbone import ARCHS, build_backbone
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import DataError
from training.distributed import DeviceError, resolve_device
from training.weights import WeightsError, load_checkpoint_teacher

log = logging.getLogger(__name__)

#: arch -> (n_last_blocks, avgpool_patchtokens): the reference eval_linear.py's advice, "n=4 when
#: evaluating ViT-Small and n=1 with ViT-Base", average pooling "False for ViT-Small and True with
#: ViT-Base"; ViT-Tiny, not in the paper's linear table, follows ViT-Small, its closest size
PAPER_FEATURES: dict[str, tuple[int, bool]] = {"vit_tiny": (4, False), "vit_small": (4, False), "vit_base": (1, True)}
#: what an ONNX model folder offers: the last block only, so the ViT-Base recipe (with the patch average)
ONNX_FEATURES = (1, True)
DEFAULT_EPOCHS = 100  # the paper's linear evaluation length
#: per 256 images: best or near-best on a held-out fifth of imagenette/train for every ViT readout measured
#: (docs/evaluations_linear.md); raw pixels (12288-d) want far less, 1e-4
DEFAULT_LR = 0.03
DEFAULT_BATCH_SIZE = 256
DEFAULT_AUG_VIEWS = 2
MOMENTUM = 0.9
INIT_STD = 0.01  # the reference's LinearClassifier initialisation
#: RandomResizedCrop's area range in the reference (torchvision's default)
CROP_SCALE = (0.08, 1.0)
#: bump when the cached arrays change meaning, so that old caches are recomputed, not misread
CACHE_VERSION = 1
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, ImageInputError)


class ProbeError(Exception):
    """Input the linear probe cannot use (model folder, options); reported in one line."""


class LinearResult(TypedDict):
    """Accuracy of the linear probe on the validation centre crops, in percent."""

    top1: float
    top5: float
    n_train: int  #: training images with features (unreadable files excluded)
    n_val: int
    num_classes: int


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Split:
    """A labelled folder's readable listing: (path, class index) pairs and the class names."""

    root: Path
    samples: list[tuple[str, int]]
    classes: list[str]
    fingerprint: str  #: changes when an image is added, removed, renamed, relabelled or rewritten


def _fingerprint(root: Path, samples: list[tuple[str, int]]) -> str:
    digest = hashlib.sha256()
    for path, target in samples:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, root)}\t{target}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _is_image(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_split(root: str | Path, what: str) -> Split:
    """The images of ``root/<class>/<image>`` (ImageFolder layout); files are not opened yet."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{what} folder {str(root)!r} does not exist or is not a folder")
    try:
        folder = ImageFolder(str(root), is_valid_file=_is_image, allow_empty=True)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{what} folder {str(root)!r}: {exc} (expected the layout root/<class>/<image>)") from exc
    if not folder.samples:
        raise DataError(f"{what} folder {str(root)!r} holds no images in its class folders")
    samples = list(folder.samples)
    return Split(root, samples, list(folder.classes), _fingerprint(root, samples))


def train_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    """The paper's linear-evaluation augmentation: RandomResizedCrop (area 8-100%) and a horizontal flip."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomResizedCrop(image_size, scale=CROP_SCALE, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(p=0.5),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=mean, std=std),
        ]
    )


class ViewsDataset(Dataset):
    """``(views [V, 3, H, W], label, index)`` per image, each image decoded once for all its views;
    ``None`` views for a file that cannot be read (skipped and counted, as ``dino train`` does)."""

    def __init__(self, samples: list[tuple[str, int]], transform, views: int):
        self.samples, self.transform, self.views = samples, transform, views

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = load_rgb(Path(path))
        except UNREADABLE as exc:
            log.warning("skipping unreadable image %s: %s", path, exc)
            return None, target, index
        return torch.stack([self.transform(image) for _ in range(self.views)]), target, index


def _collate(batch: list) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, int]:
    good = [item for item in batch if item[0] is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped
    views, targets, indices = zip(*good, strict=True)
    return torch.stack(views), torch.tensor(targets), torch.tensor(indices), skipped


# ---------------------------------------------------------------- features


class Extractor(Protocol):
    """Maps a batch of normalised images [B, 3, H, W] to feature vectors [B, F] (float32, CPU)."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class TorchFeatures:
    """The reference's ViT features: [CLS] of the last ``n`` blocks through the final norm (timm's
    ``forward_intermediates(norm=True)``, DINO's ``get_intermediate_layers``), then optionally the
    mean of the last block's normalised patch tokens."""

    def __init__(self, backbone: nn.Module, n_last_blocks: int, avgpool: bool, device: torch.device):
        depth = len(backbone.blocks)  # type: ignore[arg-type]  # timm's VisionTransformer.blocks
        if not 1 <= n_last_blocks <= depth:
            raise ProbeError(f"--n-last-blocks must be between 1 and the model's {depth} blocks, got {n_last_blocks}")
        self.backbone, self.n, self.avgpool, self.device = backbone.eval().to(device), n_last_blocks, avgpool, device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        blocks = self.backbone.forward_intermediates(
            images.to(self.device),
            indices=self.n,
            norm=True,
            return_prefix_tokens=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        parts = [prefix[:, 0] for _, prefix in blocks]
        if self.avgpool:
            parts.append(blocks[-1][0].mean(dim=1))
        return torch.cat(parts, dim=1).float().cpu()


class OnnxFeatures:
    """An exported model folder through ONNX Runtime: the last block's [CLS] ``embedding``, then
    optionally the mean of its ``patch_tokens``; the only block the graph exposes."""

    def __init__(self, folder: Path, meta: dict, avgpool: bool):
        import onnxruntime as ort  # the serve extra; the exporter's parity check uses it too

        try:
            self.session = ort.InferenceSession(str(folder / meta["file"]), providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own types (InvalidProtobuf, NoSuchFile, ...)
            raise ProbeError(f"cannot load {folder / meta['file']}: {str(exc).strip().splitlines()[0]}") from exc
        self.input_name, self.avgpool = meta["input_name"], avgpool

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        names = ["embedding", "patch_tokens"] if self.avgpool else ["embedding"]
        outputs = self.session.run(names, {self.input_name: images.numpy()})
        parts = [outputs[0]] + ([outputs[1].mean(axis=1)] if self.avgpool else [])
        return torch.from_numpy(np.concatenate(parts, axis=1).astype(np.float32))


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """The raw-pixel baseline: the normalised crop, flattened."""
    return images.flatten(1)


def _write_npz(path: Path, **arrays: Any) -> None:
    """Atomically: an interrupted write leaves no half cache that a rerun would trust."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def cached_features(
    path: Path,
    key: dict,
    split: Split,
    extractor: Extractor,
    transform,
    views: int,
    batch_size: int,
    num_workers: int,
    seed: int,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Features [n, views, F] (float16), labels [n], the number of unreadable files of a split and
    whether they came from the cache: computed once and kept in ``path``, read back when the cache's
    key is this one's."""
    key_json = json.dumps({**key, "cache_version": CACHE_VERSION, "files": split.fingerprint}, sort_keys=True)
    if path.is_file():
        try:
            with np.load(path) as cache:
                if str(cache["key"]) == key_json:
                    log.info("%s: reusing cached features %s", desc, path)
                    return (
                        torch.from_numpy(cache["features"]),
                        torch.from_numpy(cache["labels"]),
                        int(cache["skipped"]),
                        True,
                    )
            log.info("%s: cache %s was made for other inputs; recomputing", desc, path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("%s: unreadable cache %s (%s); recomputing", desc, path, exc)
    generator = torch.Generator().manual_seed(seed)  # the augmented views are the same on every rerun
    torch.manual_seed(seed)  # the main process draws the views when num_workers == 0
    loader = DataLoader(
        ViewsDataset(split.samples, transform, views),
        batch_size=max(1, batch_size // views),
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        generator=generator,
    )
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    skipped = 0
    for images, targets, _, n_bad in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        skipped += n_bad
        if images is None:
            continue
        b = images.shape[0]
        out = extractor(images.flatten(0, 1))  # all views of the batch in one forward pass
        feats.append(out.reshape(b, views, -1).half())
        labels.append(targets)
    if not feats:
        raise DataError(f"{desc}: none of the {len(split.samples)} images in {str(split.root)!r} could be read")
    features, label_tensor = torch.cat(feats), torch.cat(labels)
    if not torch.isfinite(features).all():
        raise ProbeError(f"{desc}: the features overflow float16 or are not finite")
    _write_npz(
        path,
        features=features.numpy(),
        labels=label_tensor.numpy(),
        skipped=np.int64(skipped),
        key=np.array(key_json),
    )
    return features, label_tensor, skipped, False


# ---------------------------------------------------------------- the probe


class LinearClassifier(nn.Module):
    """The reference's classifier: a single linear layer, no normalisation before it."""

    def __init__(self, dim: int, num_labels: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_labels)
        nn.init.normal_(self.linear.weight, mean=0.0, std=INIT_STD)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@torch.no_grad()
def accuracy(
    model: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 4096
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of ``model`` on [n, F] features (top-5 is 100% below 6 classes)."""
    model.eval()
    correct1 = correct5 = 0
    for start in range(0, features.shape[0], batch_size):
        logits = model(features[start : start + batch_size].float())
        targets = labels[start : start + batch_size]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == targets).sum())
        correct5 += int((top == targets[:, None]).any(dim=1).sum())
    n = features.shape[0]
    return 100.0 * correct1 / n, 100.0 * correct5 / n


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    features: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """One pass over the training images, each seen through one of its cached views; the mean loss."""
    model.train()
    n, views = features.shape[0], features.shape[1]
    view = torch.randint(views, (n,), generator=generator)
    order = torch.randperm(n, generator=generator)
    total = 0.0
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        loss = F.cross_entropy(model(features[idx, view[idx]].float()), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * idx.numel()
    return total / n


def train_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    state_path: Path,
    state_key: dict,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> tuple[LinearClassifier, list[dict]]:
    """Train (or resume training) the linear classifier; returns it with its per-epoch history
    (mean training loss and validation top-1, for the curves: the score is the last epoch's)."""
    torch.manual_seed(seed)
    model = LinearClassifier(train[0].shape[-1], num_classes)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr * batch_size / 256, momentum=MOMENTUM, weight_decay=weight_decay
    )  # the reference's linear scaling rule: --lr is per 256 images
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0)
    history: list[dict] = []
    start_epoch = 0
    key_json = json.dumps(state_key, sort_keys=True)
    if state_path.is_file():
        try:
            state = load_checkpoint(state_path)
        except WeightsError as exc:
            log.warning("unreadable probe state %s (%s); starting afresh", state_path, exc)
            state = None
        if state is not None and state.get("key") == key_json:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, history = int(state["epoch"]), list(state["history"])
            log.info("resuming the probe from %s at epoch %d/%d", state_path, start_epoch, epochs)
        elif state is not None:
            log.info("probe state %s was made with other settings; starting afresh", state_path)
    with single_thread():
        _run_epochs(
            model,
            optimizer,
            scheduler,
            train,
            val,
            history,
            state_path,
            key_json,
            start_epoch,
            epochs,
            batch_size,
            seed,
        )
    return model, history


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the probe on one thread. Its matrices (a batch of 256 vectors times a few hundred classes'
    weights) are too small to gain from more, and on a loaded machine the threads' hand-offs dominate:
    10 epochs on imagenette's 9k cached vectors took 0.34 s on one thread and 47 s on two, on the
    shared 2-core machine (docs/evaluations_linear.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run_epochs(
    model: LinearClassifier,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    history: list[dict],
    state_path: Path,
    key_json: str,
    start_epoch: int,
    epochs: int,
    batch_size: int,
    seed: int,
) -> None:
    (train_x, train_y), (val_x, val_y) = train, val
    bar = tqdm(range(start_epoch, epochs), desc="linear probe", initial=start_epoch, total=epochs, dynamic_ncols=True)
    for epoch in bar:
        # seeded by (seed, epoch), not carried over: a resumed run draws what an uninterrupted one would
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        loss = train_epoch(model, optimizer, train_x, train_y, batch_size, generator)
        scheduler.step()
        top1, _ = accuracy(model, val_x, val_y)
        if not math.isfinite(loss):
            raise ProbeError(f"the probe diverged at epoch {epoch + 1} (loss {loss}); lower --lr")
        history.append({"epoch": epoch + 1, "loss": round(loss, 5), "val_top1": round(top1, 3)})
        bar.set_postfix(loss=f"{loss:.3f}", val_top1=f"{top1:.1f}")
        state = {
            "key": key_json,
            "epoch": epoch + 1,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": history,
        }
        save_checkpoint(state, state_path)


# ---------------------------------------------------------------- sources of features


@dataclass
class Source:
    """What produces the features, and how to describe it in the JSON."""

    extractor: Extractor
    image_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    key: dict  #: identifies the features for the caches
    meta: dict  #: goes into the JSON


def _features_text(n: int, avgpool: bool) -> str:
    blocks = "the last block" if n == 1 else f"each of the last {n} blocks"
    text = f"[CLS] after the final norm of {blocks}"
    return text + (" + mean of the last block's patch tokens" if avgpool else "")


def _read_model_folder(folder: Path) -> dict:
    if not (folder / METADATA_FILE).is_file():
        raise ProbeError(f"model folder {str(folder)!r} not found (no {METADATA_FILE})")
    try:
        meta = json.loads((folder / METADATA_FILE).read_text())
        for name in ("arch", "patch_size", "image_size", "resize_size", "mean", "std", "input_name", "file"):
            meta[name]  # noqa: B018  # a KeyError names the missing entry
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ProbeError(f"{folder / METADATA_FILE} is not a valid model description ({exc})") from exc
    if not (folder / meta["file"]).is_file():
        raise ProbeError(f"model folder {str(folder)!r} lacks its graph {meta['file']!r}")
    return meta


def _feature_options(args: argparse.Namespace, arch: str, onnx: bool) -> tuple[int, bool]:
    default_n, default_pool = ONNX_FEATURES if onnx else PAPER_FEATURES.get(arch, (1, True))
    n = args.n_last_blocks or default_n
    avgpool = default_pool if args.avgpool is None else args.avgpool
    return n, avgpool


def resolve_source(args: argparse.Namespace, device: torch.device) -> Source:
    """The extractor for ``--checkpoint`` / ``--model`` / ``--baseline``, with its preprocessing."""
    size, mean, std = args.image_size, IMAGENET_MEAN, IMAGENET_STD
    arch = patch = None
    weights_id: dict = {}
    meta: dict = {}
    model_meta: dict | None = None
    teacher: nn.Module | None = None
    resize = 0
    if args.checkpoint:
        path = Path(args.checkpoint)
        if not path.is_file():
            raise DataError(f"checkpoint {str(path)!r} not found")
        teacher, cfg, ckpt_meta = load_checkpoint_teacher(path)  # weights_only: no pickled code runs
        arch, patch = cfg["arch"], int(cfg["patch_size"])
        size = size or int(cfg["global_size"])
        weights_id = {"checkpoint_sha256": ckpt_meta["source_sha256"]}
        meta.update(checkpoint=str(path), epoch=ckpt_meta["epoch"], arch=arch, patch_size=patch)
    elif args.model:
        folder = Path(args.model)
        model_meta = _read_model_folder(folder)
        arch, patch = model_meta["arch"], int(model_meta["patch_size"])
        mean, std = tuple(model_meta["mean"]), tuple(model_meta["std"])
        if not size:
            size, resize = int(model_meta["image_size"]), int(model_meta["resize_size"])
        weights_id = {"onnx_sha256": model_meta.get("sha256"), "model": str(folder.resolve())}
        meta.update(model_folder=str(folder), arch=arch, patch_size=patch)
    size = size or 224
    resize = resize or round(size * 8 / 7)
    common = {"image_size": size, "resize_size": resize, "mean": list(mean), "std": list(std)}

    if args.baseline == "pixels":
        return Source(
            pixel_features,
            size,
            resize,
            mean,
            std,
            {**common, "features": "pixels"},
            {**meta, "model": "raw pixels", "features": f"normalised pixels of the {size}x{size} crop, flattened"},
        )
    if args.baseline == "random":
        arch, patch = arch or args.arch, patch or args.patch_size
        if arch not in ARCHS:
            raise ProbeError(f"unknown --arch {arch!r}; choose one of {', '.join(sorted(ARCHS))}")
        torch.manual_seed(args.seed)
        try:
            backbone = build_backbone(arch, patch, size)
        except ValueError as exc:
            raise ProbeError(str(exc)) from exc
        # like for like: the random network is read out as the model it stands in for would be
        n, avgpool = _feature_options(args, arch, onnx=model_meta is not None)
        return Source(
            TorchFeatures(backbone, n, avgpool, device),
            size,
            resize,
            mean,
            std,
            {**common, "random_init": [arch, patch, args.seed], "n_last_blocks": n, "avgpool": avgpool},
            {
                **meta,
                "model": "random init",
                "arch": arch,
                "patch_size": patch,
                "seed": args.seed,
                "n_last_blocks": n,
                "avgpool": avgpool,
                "features": _features_text(n, avgpool),
            },
        )
    if teacher is not None:
        assert arch is not None
        n, avgpool = _feature_options(args, arch, onnx=False)
        return Source(
            TorchFeatures(teacher, n, avgpool, device),
            size,
            resize,
            mean,
            std,
            {**common, **weights_id, "n_last_blocks": n, "avgpool": avgpool},
            {
                **meta,
                "model": "teacher",
                "n_last_blocks": n,
                "avgpool": avgpool,
                "features": _features_text(n, avgpool),
            },
        )
    assert model_meta is not None and arch is not None
    n, avgpool = _feature_options(args, arch, onnx=True)
    if n != 1:
        raise ProbeError(
            f"--n-last-blocks {n}: an exported ONNX model exposes only its last block; use --checkpoint for more"
        )
    return Source(
        OnnxFeatures(Path(args.model), model_meta, avgpool),
        size,
        resize,
        mean,
        std,
        {**common, **weights_id, "n_last_blocks": 1, "avgpool": avgpool},
        {
            **meta,
            "model": "exported ONNX model",
            "n_last_blocks": 1,
            "avgpool": avgpool,
            "features": _features_text(1, avgpool)
            + " (ONNX outputs 'embedding'"
            + (" and 'patch_tokens'" if avgpool else "")
            + "; the graph exposes only the last block)",
        },
    )


# ---------------------------------------------------------------- command line: dino linear


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="RUN/checkpoint.pth written by dino train (its teacher)")
    source.add_argument("--model", help="an exported model folder (model.json + model.onnx): last block only")
    parser.add_argument("--train", required=True, help="labelled training folder (ImageFolder layout)")
    parser.add_argument("--val", required=True, help="labelled validation folder, the same class folders")
    parser.add_argument(
        "--output",
        help="JSON result (default: linear.json next to the checkpoint, else ./linear.json); "
        "the feature caches OUTPUT.{train,val}.npz and the probe state OUTPUT.probe.pt go next to it",
    )
    parser.add_argument(
        "--baseline", choices=["random", "pixels"], help="evaluate a random-init network or raw pixels instead"
    )
    parser.add_argument(
        "--n-last-blocks",
        type=int,
        default=0,
        help="concatenate the [CLS] of this many last blocks (default: 4 for vit_tiny/vit_small, 1 for vit_base "
        "and ONNX models, as the paper)",
    )
    parser.add_argument(
        "--avgpool",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="append the mean of the last block's patch tokens (default: off for vit_tiny/vit_small, on for "
        "vit_base and ONNX models)",
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument(
        "--lr",
        type=float,
        default=DEFAULT_LR,
        help="SGD learning rate per 256 images, cosine to 0 (default %(default)s; raw pixels want about 1e-4)",
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="probe batch size")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument(
        "--aug-views",
        type=int,
        default=DEFAULT_AUG_VIEWS,
        help="augmented views (RandomResizedCrop + flip) cached per training image; 0: the centre crop only",
    )
    parser.add_argument("--image-size", type=int, default=0, help="crop size (default: the model's, else 224)")
    parser.add_argument("--feature-batch-size", type=int, default=128, help="images per backbone forward pass")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="for the backbone")
    parser.add_argument("--arch", default="vit_tiny", help="with --baseline random and no checkpoint/model")
    parser.add_argument("--patch-size", type=int, default=16, help="with --baseline random and no checkpoint/model")
    parser.add_argument("--seed", type=int, default=0, help="views, probe initialisation and order; random init")


def _check_options(args: argparse.Namespace) -> str | None:
    if not (args.checkpoint or args.model or args.baseline):
        return "give --checkpoint or --model (or --baseline pixels / random)"
    for name in ("epochs", "batch_size", "feature_batch_size"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    if args.aug_views < 0 or args.n_last_blocks < 0 or args.num_workers < 0 or args.image_size < 0:
        return "--aug-views, --n-last-blocks, --num-workers and --image-size must be >= 0"
    if not (args.lr > 0 and math.isfinite(args.lr)) or args.weight_decay < 0:
        return "--lr must be > 0 and --weight-decay >= 0"
    return None


def default_output(args: argparse.Namespace) -> Path:
    if args.output:
        return Path(args.output)
    if args.checkpoint and not args.baseline:
        return Path(args.checkpoint).with_name("linear.json")
    return Path("linear.json")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    problem = _check_options(args)
    if problem:
        print(f"dino linear: {problem}", file=sys.stderr)
        return 2
    output = default_output(args)
    start = time.time()
    try:
        device = resolve_device(args.device)
        train_split, val_split = list_split(args.train, "training"), list_split(args.val, "validation")
        if train_split.classes != val_split.classes:
            only_train = sorted(set(train_split.classes) - set(val_split.classes))
            only_val = sorted(set(val_split.classes) - set(train_split.classes))
            raise DataError(
                f"the class folders of {args.train} and {args.val} differ "
                f"(only in train: {only_train[:5]}, only in val: {only_val[:5]})"
            )
        source = resolve_source(args, device)
        output.parent.mkdir(parents=True, exist_ok=True)
        extract = {"batch_size": args.feature_batch_size, "num_workers": args.num_workers, "seed": args.seed}
        val_x, val_y, val_skipped, val_cached = cached_features(
            output.with_suffix(".val.npz"),
            {**source.key, "split": "val", "views": "centre crop"},
            val_split,
            source.extractor,
            eval_transform(source.image_size, source.resize_size, source.mean, source.std),
            views=1,
            desc="val features",
            **extract,
        )
        if args.aug_views:
            transform = train_transform(source.image_size, source.mean, source.std)
            views_key: Any = {"augmented": args.aug_views, "scale": list(CROP_SCALE), "seed": args.seed}
        else:
            transform = eval_transform(source.image_size, source.resize_size, source.mean, source.std)
            views_key = "centre crop"
        train_x, train_y, train_skipped, train_cached = cached_features(
            output.with_suffix(".train.npz"),
            {**source.key, "split": "train", "views": views_key},
            train_split,
            source.extractor,
            transform,
            views=max(1, args.aug_views),
            desc="train features",
            **extract,
        )
        feature_seconds = time.time() - start
        hyper = {
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "weight_decay": args.weight_decay,
            "seed": args.seed,
        }
        probe_start = time.time()
        probe, history = train_probe(
            (train_x, train_y),
            (val_x[:, 0], val_y),
            len(train_split.classes),
            output.with_suffix(".probe.pt"),
            {
                "features": source.key,
                "views": views_key,
                "files": [train_split.fingerprint, val_split.fingerprint],
                **hyper,
            },
            **hyper,
        )
        top1, top5 = accuracy(probe, val_x[:, 0], val_y)
    except (DataError, DeviceError, WeightsError, ProbeError) as exc:
        print(f"dino linear: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. an output folder that cannot be written
        print(f"dino linear: {exc}", file=sys.stderr)
        return 1
    result = LinearResult(
        top1=top1,
        top5=top5,
        n_train=int(train_x.shape[0]),
        n_val=int(val_x.shape[0]),
        num_classes=len(val_split.classes),
    )
    record = {
        **result,
        **source.meta,
        "protocol": "linear probe on frozen features (Caron et al. 2021, Sec. 4.1): SGD momentum 0.9, cosine lr, "
        "RandomResizedCrop + flip views cached once; top-1/top-5 of the last epoch on the validation centre crops",
        "feature_dim": int(train_x.shape[-1]),
        **hyper,
        "aug_views": args.aug_views,
        "image_size": source.image_size,
        "resize_size": source.resize_size,
        "skipped_train": train_skipped,
        "skipped_val": val_skipped,
        "features_from_cache": {"train": train_cached, "val": val_cached},
        "feature_seconds": round(feature_seconds, 1),
        "probe_seconds": round(time.time() - probe_start, 1),
        "seconds": round(time.time() - start, 1),
        "train": str(args.train),
        "val": str(args.val),
        "history": history,
    }
    skipped = f", {train_skipped + val_skipped} unreadable image(s) skipped" if train_skipped + val_skipped else ""
    print(
        f"linear probe ({source.meta.get('model')}, {record['features']}, {record['feature_dim']}-d, "
        f"{result['n_train']} train / {result['n_val']} val{skipped}): top-1 {top1:.2f}%  top-5 {top5:.2f}%"
    )
    output.write_text(json.dumps(record, indent=2))
    print(f"wrote {output}")
    return 0
