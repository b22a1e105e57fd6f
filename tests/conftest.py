"""Repo-wide fixtures: where the real image data lives.

The folder is resolved by ``dino.data_dir.data_dir()``, the one place that reads ``DINO_DATA_DIR``
(default ``<repo>/../shared/data``); tests that need it are skipped when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dino.data_dir import data_dir as real_data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The read-only real data folder (``DINO_DATA_DIR``, default ``../shared/data``)."""
    folder = real_data_dir()
    if not folder.is_dir():
        pytest.skip(f"real data folder {folder} is absent (set DINO_DATA_DIR)")
    return folder


@pytest.fixture(scope="session")
def sample_photos(data_dir: Path) -> list[Path]:
    """The 100 full-size ImageNet sample photos, sorted."""
    return sorted((data_dir / "imagenet-sample").glob("*.JPEG"))
