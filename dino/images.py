"""Images from untrusted bytes and from folders, with Pillow and NumPy only (no torch, no HTTP).

The one home of what training and serving must agree on about pixels: which files are images
(:func:`list_image_files`), how bytes are decoded (:func:`decode_image`), how the EXIF orientation is
applied and how every Pillow mode becomes 8-bit RGB (:func:`to_rgb`), so that a model is trained on
the pixels it is later served.

Decoding is defensive, because the bytes come from anyone:

- only raster formats with Pillow's own decoders are opened (no EPS/PostScript, which would start
  Ghostscript, and no other plugin that shells out);
- the width and height are read from the header and checked against ``max_pixels`` *before* the
  pixels are decoded, so decompression bombs and absurd headers (a 65000x65000 JPEG of a few hundred
  bytes) are refused without allocating anything (:class:`ImageTooLarge`);
- undecodable input is :class:`UnsupportedImage` (not an image / unknown format) or
  :class:`InvalidImage` (empty, truncated, corrupt).

The errors carry a message and no transport status: the service maps them to HTTP answers in its
exception handlers (``service.app``), training skips the file and counts it.

A caller that only needs a downscaled image (the service's evaluation transform, whose shorter side
is 73 or 256 pixels) may let a JPEG be decoded at a reduced scale (:func:`decode_image_reduced`):
libjpeg's DCT scaling decodes 1/2, 1/4 or 1/8 of the size, skipping most of the inverse DCT, the
chroma upsampling and the colour conversion, and leaving 4 to 64 times fewer pixels to the resize
that follows. The checks above still apply to the size in the header.

Then the EXIF orientation is applied, the first frame of an animated image is used, and every
Pillow mode is converted to 8-bit RGB as follows (:func:`to_rgb`):

==================================  ===============================================================
mode                                conversion
==================================  ===============================================================
RGB                                 unchanged
1, L                                grey replicated to R, G, B (mode 1: 0 or 255)
P without transparency              palette looked up
RGBA, LA, La, RGBa, PA, and P, L,   alpha composited over white: ``a * colour + (1 - a) * 255``
RGB with a transparency key
I;16, I;16B, I;16L, I;16N           16-bit grey scaled by the 16-bit range: ``v * 255 / 65535``
I (32-bit integer)                  0..255 kept, 0..65535 scaled as 16-bit, else min-max stretched
F (32-bit float)                    0..1 scaled by 255, 0..255 kept, else min-max stretched; NaN -> 0
CMYK, YCbCr, LAB, HSV, others       Pillow's ``convert("RGB")`` (no ICC colour management)
==================================  ===============================================================
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

#: file extensions treated as images when a folder is scanned (training data, gallery builds)
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".avif"}
)


def list_image_files(root: Path) -> list[Path]:
    """Image files below ``root`` (recursive, sorted so that every run sees the same order)."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def label_of(path: Path, root: Path) -> str | None:
    """The label of an image in a labelled folder: its subfolder path relative to the root ("cat",
    "train/cat"); None for an image at the top level."""
    parent = path.parent.relative_to(root)
    return None if parent == Path(".") else parent.as_posix()


Image.init()
#: Pillow formats accepted from clients: pure raster decoders (no plugin that runs external programs)
ACCEPTED_FORMATS = tuple(
    f for f in ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF") if f in Image.OPEN
)
WHITE = (255, 255, 255, 255)
#: JPEG start-of-scan marker: counted to bound the decode cost of progressive JPEGs
JPEG_SOS_MARKER = b"\xff\xda"
#: most scans a JPEG may have. libjpeg's progressive script uses 10 for colour images and optimising
#: encoders stay near that, but each scan is a pass over the whole image: a few hundred kilobytes that
#: repeat one scan thousands of times cost seconds of CPU to decode
DEFAULT_MAX_JPEG_SCANS = 64
#: TIFF tags of the tile size; a tile is decoded into one buffer of its full size
TIFF_TILE_WIDTH, TIFF_TILE_LENGTH = 322, 323
#: a tile may always be this large (pixels), even when the image is smaller (tiles are padded)
TILE_PIXELS_ALLOWANCE = 1 << 20
#: rows converted at a time from 16-bit, 32-bit and float greys: bounds the float working copy
GREY_BAND_PIXELS = 1 << 20
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
UINT16_MAX = 65535.0
#: formats decoded by libjpeg, which can decode at 1/2, 1/4 or 1/8 of the size (``Image.draft``)
REDUCIBLE_FORMATS = frozenset({"JPEG", "MPO"})
#: EXIF orientation -> the transposition that shows the image upright (``ImageOps.exif_transpose``'s table)
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
#: transpositions that swap width and height
SWAPPING_TRANSPOSES = frozenset(
    {Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270}
)


class ImageInputError(Exception):
    """Image bytes or a file that cannot be used; ``detail`` is a message fit for the person who sent it."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class ImageTooLarge(ImageInputError):
    """Too many pixels (decompression bomb, absurd header) or too many bytes."""


class UnsupportedImage(ImageInputError):
    """Not an image, or a format/pixel mode the service does not decode."""


class InvalidImage(ImageInputError):
    """An image format we know, but the data is empty, truncated or corrupt."""


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image from :func:`decode_image_reduced`, and where the full-size image lies in it."""

    #: 8-bit RGB, EXIF orientation applied; smaller than ``full_size`` after a reduced decode
    image: Image.Image
    #: (width, height) of the image at full scale, oriented as ``image``
    full_size: tuple[int, int]
    #: the region of ``image`` that shows the full-size image (left, upper, right, lower), in
    #: ``image``'s pixels: ``(0, 0, width, height)``, except after a 1/s reduction of a side that is not
    #: a multiple of s, whose last row or column stands for fewer than s pixels (fractional bounds)
    box: tuple[float, float, float, float]

    @property
    def reduced(self) -> bool:
        return self.image.size != self.full_size


def decode_image(data: bytes, max_pixels: int, max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS) -> Image.Image:
    """Decode untrusted bytes into an 8-bit RGB image (EXIF orientation applied, first frame).

    What the header says is checked before any pixel is decoded: the pixel count, the number of JPEG
    scans (:data:`DEFAULT_MAX_JPEG_SCANS`) and the TIFF tile size, so that the cost in CPU and memory
    is bounded by ``max_pixels`` whatever a small file claims.

    Raises :class:`ImageInputError` subclasses with a message fit for the client.
    """
    return decode_image_reduced(data, max_pixels, 0, max_jpeg_scans).image


def decode_image_reduced(
    data: bytes, max_pixels: int, min_side: int, max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS
) -> DecodedImage:
    """:func:`decode_image`, but a JPEG may be decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT
    scaling) as long as its shorter side stays at least ``min_side`` pixels (0: always full size).

    For callers that downscale the image anyway: the reduced decode is a good low-pass (each output
    pixel comes from the low frequencies of its s x s block), and :attr:`DecodedImage.box` says where
    the full-size image lies in the result, so that a resize (``Image.resize(..., box=...)``) samples
    the same points as from the full decode. The header checks apply to the full size; other formats
    are decoded at full size.
    """
    if not data:
        raise InvalidImage("empty file: no image data")
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedImage(f"not a supported image: the data is not one of {', '.join(ACCEPTED_FORMATS)}") from exc
    except Exception as exc:  # a known format whose header is corrupt (SyntaxError, OSError, struct.error, ...)
        raise InvalidImage(f"corrupt image header: {exc}") from exc
    # No close(): the bytes are in memory, and closing would invalidate an image returned unchanged
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image too large: {width}x{height} = {width * height} pixels, the limit is {max_pixels} pixels"
        )
    check_decode_cost(img, data, max_jpeg_scans)
    box: tuple[float, float, float, float] = (0.0, 0.0, float(width), float(height))
    # Animated GIF/WebP/APNG and multi-page TIFF: Image.open is positioned on the first frame already;
    # seek(0) makes that explicit (and is a no-op for single-frame images).
    try:
        img.seek(0)
        if min_side > 0 and img.format in REDUCIBLE_FORMATS:
            box = _reduce_on_load(img, min_side) or box
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from exc
    except MemoryError as exc:
        raise ImageTooLarge("image too large to decode") from exc
    except Exception as exc:  # OSError "image file is truncated", ValueError for oversized chunks, ...
        raise InvalidImage(f"corrupt or truncated {img.format} image: {exc}") from exc
    try:
        method = orientation_transpose(img)
        oriented = apply_exif_orientation(img)
        full_size = (width, height)
        if oriented is not img and method is not None:  # rotated or flipped: so are the full size and the box
            box = transpose_box(box, img.size, method)
            if method in SWAPPING_TRANSPOSES:
                full_size = (height, width)
        return DecodedImage(to_rgb(oriented), full_size, box)
    except ImageInputError:
        raise
    except MemoryError as exc:
        raise ImageTooLarge("image too large to convert") from exc
    except Exception as exc:  # a decoded image Pillow cannot convert (exotic mode/palette)
        raise InvalidImage(f"cannot convert the {img.mode} image to RGB: {exc}") from exc


def _reduce_on_load(img: Image.Image, min_side: int) -> tuple[float, float, float, float] | None:
    """Ask libjpeg (before ``load``) for the largest reduction 1/s, s in 2, 4, 8, that keeps the shorter
    side at least ``min_side``; the box of the full image in the reduced one, or None when it stays full size.

    ``Image.draft`` picks s <= min(width // w, height // h) for a requested (w, h): asking for
    (min_side, min_side) gives s <= shorter // min_side, so the reduced shorter side, ceil(shorter / s),
    is at least min_side. The mode is kept (the conversion to RGB is :func:`to_rgb`'s).
    """
    if min(img.size) // min_side < 2:
        return None
    drafted = img.draft(img.mode, (min_side, min_side))
    if drafted is None:  # not a single-tile JPEG, or drafted already: decoded at full size
        return None
    _, box = drafted
    return (float(box[0]), float(box[1]), float(box[2]), float(box[3]))


def transpose_box(
    box: tuple[float, float, float, float], size: tuple[int, int], method: Image.Transpose
) -> tuple[float, float, float, float]:
    """Where a region (left, upper, right, lower) of an image of ``size`` lands once the image is
    transposed by ``method`` (``Image.transpose``: ROTATE_90 is counter-clockwise)."""
    left, top, right, bottom = box
    w, h = size
    T = Image.Transpose
    mapping = {
        T.FLIP_LEFT_RIGHT: (w - right, top, w - left, bottom),
        T.FLIP_TOP_BOTTOM: (left, h - bottom, right, h - top),
        T.ROTATE_180: (w - right, h - bottom, w - left, h - top),
        T.TRANSPOSE: (top, left, bottom, right),  # (x, y) -> (y, x)
        T.ROTATE_90: (top, w - right, bottom, w - left),  # (x, y) -> (y, w - x)
        T.ROTATE_270: (h - bottom, left, h - top, right),  # (x, y) -> (h - y, x)
        T.TRANSVERSE: (h - bottom, w - right, h - top, w - left),  # (x, y) -> (h - y, w - x)
    }
    return mapping.get(method, box)


def check_decode_cost(img: Image.Image, data: bytes, max_jpeg_scans: int) -> None:
    """Refuse, from the header alone, images whose decoding would cost far more than their pixel count.

    - Progressive JPEG: every scan is a pass over the whole image. The ``FFDA`` (start of scan)
      marker cannot occur inside entropy-coded data (a data byte ``FF`` is always followed by ``00``),
      so counting it counts the scans, or a few more when an embedded thumbnail has its own.
    - TIFF: a tile is decoded into one buffer of the tile's size, which the header can make far
      larger than the image (a 16x16 image with one 32768x32768 tile takes 1 GB).
    """
    if img.format in ("JPEG", "MPO"):
        scans = data.count(JPEG_SOS_MARKER)
        if scans > max_jpeg_scans:
            raise ImageTooLarge(
                f"JPEG too costly to decode: {scans} scans, the limit is {max_jpeg_scans} "
                "(a progressive JPEG has about 10)"
            )
    elif img.format == "TIFF":
        tags = getattr(img, "tag_v2", {})
        tile_width, tile_length = tags.get(TIFF_TILE_WIDTH), tags.get(TIFF_TILE_LENGTH)
        if tile_width and tile_length:
            budget = max(img.size[0] * img.size[1], TILE_PIXELS_ALLOWANCE)
            if int(tile_width) * int(tile_length) > budget:
                raise ImageTooLarge(
                    f"TIFF tiles of {tile_width}x{tile_length} pixels for a {img.size[0]}x{img.size[1]} image: "
                    f"tiles may hold at most {budget} pixels"
                )


def orientation_transpose(img: Image.Image) -> Image.Transpose | None:
    """The transposition that the EXIF (or XMP) Orientation tag asks for; None when upright, absent,
    unknown or when the EXIF block cannot be read."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as exc:  # malformed EXIF: Pillow raises various errors while parsing it
        log.debug("ignoring malformed EXIF data: %s", exc)
        return None
    return ORIENTATION_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None


def apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says (a photo taken in portrait is stored sideways).

    An upright image is returned as it is (no copy). A malformed EXIF block is ignored (the pixels
    are still valid) rather than refused.
    """
    if orientation_transpose(img) is None:
        return img
    try:
        transposed = ImageOps.exif_transpose(img)
    except Exception as exc:  # malformed EXIF: Pillow raises various errors while parsing it
        log.debug("ignoring malformed EXIF data: %s", exc)
        return img
    return img if transposed is None else transposed


def _grey_bands(img: Image.Image):
    """The image's pixels as NumPy row bands of about :data:`GREY_BAND_PIXELS` (copies of one band at a time)."""
    width, height = img.size
    rows = max(1, GREY_BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        yield top, np.asarray(img.crop((0, top, width, min(height, top + rows))))


def _grey_range(img: Image.Image) -> tuple[float, float]:
    """Smallest and largest value of a 32-bit integer or float image, NaN and +-inf counted as 0."""
    lo, hi = np.inf, -np.inf
    for _, band in _grey_bands(img):
        if band.dtype.kind == "f":
            band = np.where(np.isfinite(band), band, 0.0)
        if band.size:
            lo, hi = min(lo, float(band.min())), max(hi, float(band.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


def _grey_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a single-channel 16-bit, 32-bit integer or float image to 0..255 (see the module table).

    Band by band: the float working copy is one band, not the whole image (a 6000x6000 16-bit PNG of
    70 KB would otherwise take over a gigabyte of float64 temporaries).
    """
    mode = img.mode
    offset, scale = 0.0, 1.0  # uint8 = rint((v - offset) * scale), clipped
    if mode in SIXTEEN_BIT_MODES:
        scale = 255.0 / UINT16_MAX
    else:
        lo, hi = _grey_range(img)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            scale = 255.0
        elif lo >= 0.0 and hi <= 255.0:
            pass
        elif mode == "I" and lo >= 0.0 and hi <= UINT16_MAX:
            scale = 255.0 / UINT16_MAX
        elif hi > lo:
            offset, scale = lo, 255.0 / (hi - lo)
        else:
            scale = 0.0
    out = np.empty((img.size[1], img.size[0]), dtype=np.uint8)
    for top, band in _grey_bands(img):
        v = band.astype(np.float64)
        v[~np.isfinite(v)] = 0.0  # NaN and +-inf carry no intensity: the value 0
        out[top : top + band.shape[0]] = np.clip(np.rint((v - offset) * scale), 0, 255).astype(np.uint8)
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB as documented in the module's table."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_grey_to_uint8(img), mode="L").convert("RGB")
    if img.has_transparency_data:
        # Transparent pixels have no defined colour: composite them over white, like a browser page
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnsupportedImage(f"unsupported pixel mode {mode!r}") from exc


def load_rgb(path: Path) -> Image.Image:
    """Open an image file fully (so that truncation is detected now), apply its EXIF orientation and
    convert it to RGB exactly as :func:`decode_image` does, so that training sees the served pixels."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(apply_exif_orientation(img))
