"""Where the real image data lives: the one place that reads ``DINO_DATA_DIR``.

Tests, benchmarks and the evaluation commands read real photos (CIFAR-10, Imagenette, ImageNet
sample photos) from one read-only folder: ``$DINO_DATA_DIR`` when set, else ``shared/data`` beside
the repository checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

#: the environment variable that points at the data folder
DATA_DIR_ENV = "DINO_DATA_DIR"
#: the checkout's root (the folder holding ``dino/``)
REPO_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """``$DINO_DATA_DIR``, else ``<repo>/../shared/data`` (the folder may not exist)."""
    configured = os.environ.get(DATA_DIR_ENV)
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
