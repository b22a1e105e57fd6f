"""Unlabelled image folders: every image below a root, any depth; unreadable files are skipped."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dino.images import IMAGE_EXTENSIONS, ImageInputError, list_image_files, load_rgb

log = logging.getLogger(__name__)


class DataError(Exception):
    """A problem with the user's data folder that stops training (missing, empty)."""


def find_images(root: str | os.PathLike) -> list[Path]:
    """All image files below ``root`` (recursive, sorted for reproducibility)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {str(root)!r} is not a folder")
    files = list_image_files(root)
    if not files:
        raise DataError(
            f"no images found in {str(root)!r} (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return files


class UnlabelledImageFolder(Dataset):
    """Images of a folder tree, labels ignored. ``__getitem__`` returns ``transform(image)``, or
    ``None`` for a corrupt/unreadable file; ``collate_skip_none`` drops those from the batch and the
    training loop counts them."""

    def __init__(self, root: str | os.PathLike, transform: Callable[[Image.Image], object]):
        self.root = Path(root)
        self.files = find_images(root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        try:
            image = load_rgb(path)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, ImageInputError) as exc:
            log.warning("skipping unreadable image %s: %s", path, exc)
            return None
        return self.transform(image)


def collate_skip_none(batch: list) -> tuple[list[torch.Tensor] | None, int]:
    """Stack multi-crop samples crop by crop; returns ``(crops, n_skipped)``."""
    good = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, skipped
    return [torch.stack(views) for views in zip(*good, strict=True)], skipped
