"""Shared fixtures: where the real image data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DINO_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The read-only real data folder (``DINO_DATA_DIR``, default ``../shared/data``)."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data folder {DATA_DIR} is absent (set DINO_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def sample_photos(data_dir: Path) -> list[Path]:
    """The 100 full-size ImageNet sample photos, sorted."""
    return sorted((data_dir / "imagenet-sample").glob("*.JPEG"))
