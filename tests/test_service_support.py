"""Shared helpers of the service tests (no tests here): the test model, real photos, generated
images for the bad-input set, and a real ``dino serve`` process on 127.0.0.1.

The test model is a randomly initialised ViT-Tiny/8 at 64 px exported by ``training.export`` (the
real exporter). Exporting takes ~20 s on two cores, so the folder is cached in pytest's cache
directory under a key made of the exporter's source and the torch/timm/onnx versions: a change to
the exporter produces a fresh export.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ServerProcess, free_port  # noqa: F401  (used by the test modules)

REPO = Path(__file__).resolve().parent.parent
TEST_MODEL = {"arch": "vit_tiny", "patch_size": 8, "image_size": 64, "seed": 0}


def photos_root() -> Path:
    """The shared real-image folder (``DINO_DATA_DIR``, default ``<repo>/../shared/data``)."""
    return Path(os.environ.get("DINO_DATA_DIR", REPO.parent / "shared" / "data"))


def photo_paths() -> list[Path]:
    """The 100 full-size ImageNet photos (sorted); skips the test when the data folder is absent."""
    folder = photos_root() / "imagenet-sample"
    files = sorted(folder.glob("*.JPEG")) if folder.is_dir() else []
    if not files:
        pytest.skip(f"real photos not found in {folder} (set DINO_DATA_DIR to the shared data folder)")
    return files


# --------------------------------------------------------------------------------------------------
# the test model
# --------------------------------------------------------------------------------------------------


def _exporter_fingerprint() -> str:
    """Exporter source + library versions (read from package metadata: importing torch is slow)."""
    digest = hashlib.sha256()
    for source in ("training/export.py", "training/export_graph.py", "training/backbone.py"):
        digest.update((REPO / source).read_bytes())
    versions = [importlib.metadata.version(package) for package in ("torch", "timm", "onnx", "onnxscript")]
    digest.update(f"{versions} {sorted(TEST_MODEL.items())}".encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def export_test_model(cache_root: Path) -> Path:
    """Export (once per exporter version) the tiny test model; returns its model folder."""
    folder = cache_root / f"vit_tiny8_64-{_exporter_fingerprint()}"
    if (folder / "model.json").is_file():
        return folder
    import torch

    from training.backbone import build_backbone
    from training.export import export_backbone

    torch.manual_seed(TEST_MODEL["seed"])
    backbone = build_backbone(TEST_MODEL["arch"], TEST_MODEL["patch_size"], TEST_MODEL["image_size"])
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    export_backbone(
        backbone,
        tmp,
        name="test-vit-tiny8",
        arch=TEST_MODEL["arch"],
        patch_size=TEST_MODEL["patch_size"],
        image_size=TEST_MODEL["image_size"],
        provenance={"source": "random init (service tests)", "seed": TEST_MODEL["seed"]},
    )
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    for stale in cache_root.glob("vit_tiny8_64-*"):  # exports of older exporter versions
        if stale != folder and not stale.name.endswith(f".tmp{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return folder


@pytest.fixture(scope="session")
def model_dir(request, tmp_path_factory) -> Path:
    """A model folder made by training.export (cached across test runs in pytest's cache folder)."""
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    root = Path(cache.mkdir("dino-service-test-model")) if cache is not None else tmp_path_factory.mktemp("model")
    return export_test_model(root)


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def photo(index: int = 0) -> Image.Image:
    """A real photo, decoded to RGB."""
    with Image.open(photo_paths()[index]) as img:
        return img.convert("RGB")


def photo_bytes(index: int = 0) -> bytes:
    return photo_paths()[index].read_bytes()


def with_jpeg_dimensions(jpeg: bytes, width: int, height: int) -> bytes:
    """A copy of a JPEG whose frame header (SOF) claims another size (the pixel data is unchanged)."""
    data = bytearray(jpeg)
    i = 2
    while i < len(data):
        marker = data[i + 1]
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):  # baseline / extended / progressive frame header
            data[i + 5 : i + 7] = height.to_bytes(2, "big")
            data[i + 7 : i + 9] = width.to_bytes(2, "big")
            return bytes(data)
        i += 2 + length
    raise ValueError("no SOF marker found")


def png_bomb(side: int) -> bytes:
    """A genuine decompression bomb: a side x side grey PNG of zeros, a few hundred KB compressed."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit greyscale
    compressor = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + pixels
    parts = [compressor.compress(row) for _ in range(side)]
    parts.append(compressor.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def animated_gif(first: Image.Image, second: Image.Image) -> bytes:
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def exif_rotated_jpeg(img: Image.Image, orientation: int) -> bytes:
    """JPEG of ``img``'s pixels tagged with an EXIF orientation (the viewer must rotate them)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def multipart(*images: bytes, field: str = "images") -> list:
    """``files=`` argument of httpx/TestClient for images in one multipart field."""
    return [(field, (f"image{i}.bin", data, "application/octet-stream")) for i, data in enumerate(images)]


# --------------------------------------------------------------------------------------------------
# a real server process
# --------------------------------------------------------------------------------------------------


def image_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)
