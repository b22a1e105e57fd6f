"""Images for the service tests (plain functions, no fixtures): real photos, and generated files for
the bad-input set (decompression bombs, lying JPEG headers, EXIF rotation, animated GIFs).

The real photos are the ImageNet sample photos of the data folder that ``dino.data_dir.data_dir()``
resolves; a test that asks for one is skipped when they are absent.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pytest
from PIL import Image

from dino.data_dir import data_dir


def photo_paths() -> list[Path]:
    """The 100 full-size ImageNet photos (sorted); skips the test when the data folder is absent."""
    folder = data_dir() / "imagenet-sample"
    files = sorted(folder.glob("*.JPEG")) if folder.is_dir() else []
    if not files:
        pytest.skip(f"real photos not found in {folder} (set DINO_DATA_DIR to the shared data folder)")
    return files


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
