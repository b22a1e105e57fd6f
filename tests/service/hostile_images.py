"""Small files that are costly to decode: what an attacker (or a careless client) can send.

Each one is a few hundred kilobytes at most and within the service's pixel limit, yet decoding it
naively costs seconds of CPU or a gigabyte of memory. Used by the service tests and by
``benchmarks/hostile_load.py``.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

#: JPEG markers: start of scan, end of image
SOS, EOI = 0xDA, 0xD9
#: restart markers may occur inside entropy-coded data
RST_MARKERS = range(0xD0, 0xD8)


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a JPEG; a scan's segment includes its entropy-coded data."""
    out, i = [], 2
    while i < len(data):
        marker = data[i + 1]
        if marker == EOI:
            out.append((marker, i, i + 2))
            break
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == SOS:
            while not (data[end] == 0xFF and data[end + 1] != 0 and data[end + 1] not in RST_MARKERS):
                end += 1
        out.append((marker, i, end))
        i = end
    return out


def many_scan_jpeg(side: int = 6000, scans: int = 3000) -> bytes:
    """A progressive JPEG whose last (refinement) scan is repeated until it has ``scans`` scans:
    about 390 KB at the defaults, and every scan is a pass over all ``side`` x ``side`` pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 80, 40)).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    segments = jpeg_segments(data)
    own = [s for s in segments if s[0] == SOS]
    _, start, end = own[-1]
    eoi = segments[-1][1]
    return data[:eoi] + data[start:end] * (scans - len(own)) + data[eoi:]


def sixteen_bit_png(side: int = 6000) -> bytes:
    """A ``side`` x ``side`` 16-bit greyscale PNG of zeros: about 70 KB at the default size."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((side, side), dtype=np.uint16)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def huge_tile_tiff(side: int = 16, tile: int = 32768) -> bytes:
    """A ``side`` x ``side`` TIFF whose one deflate-compressed tile is ``tile`` x ``tile``: about 1 MB,
    and a decoder allocates the whole tile (1 GiB at the defaults)."""
    compressor = zlib.compressobj(9)
    block = bytes(1 << 20)
    payload = b"".join(compressor.compress(block) for _ in range(tile * tile // len(block))) + compressor.flush()
    entries = [  # (tag, type: 3 SHORT / 4 LONG, value)
        (256, 4, side),  # ImageWidth
        (257, 4, side),  # ImageLength
        (258, 3, 8),  # BitsPerSample
        (259, 3, 8),  # Compression: deflate
        (262, 3, 1),  # PhotometricInterpretation: black is zero
        (277, 3, 1),  # SamplesPerPixel
        (322, 4, tile),  # TileWidth
        (323, 4, tile),  # TileLength
        (324, 4, 0),  # TileOffsets (filled in below)
        (325, 4, len(payload)),  # TileByteCounts
    ]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 324 else value
        ifd += struct.pack("<HHIHH", tag, kind, 1, value, 0) if kind == 3 else struct.pack("<HHII", tag, kind, 1, value)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + payload


def large_photo_jpeg(side: int = 6000, progressive: bool = True, quality: int = 85) -> bytes:
    """A legitimate but large photo-like JPEG (gradients plus fine noise), ``side`` x ``side``: about
    5 MB at the default size."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack([ramp[None, :].repeat(side, 0), ramp[:, None].repeat(side, 1), np.full((side, side), 96.0)], -1)
    pixels += rng.normal(0, 3, pixels.shape).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        buffer, "JPEG", progressive=progressive, quality=quality
    )
    return buffer.getvalue()


def nested_json(depth: int) -> str:
    """``depth`` nested JSON lists: ``[[[...]]]``."""
    return "[" * depth + "]" * depth
