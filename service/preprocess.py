"""Image decoding and the model's evaluation transform, with Pillow and NumPy only.

Decoding is defensive, because the bytes come from anyone:

- only raster formats with Pillow's own decoders are opened (no EPS/PostScript, which would start
  Ghostscript, and no other plugin that shells out);
- the width and height are read from the header and checked against ``max_pixels`` *before* the
  pixels are decoded, so decompression bombs and absurd headers (a 65000x65000 JPEG of a few hundred
  bytes) are refused without allocating anything (:class:`ImageTooLarge`, HTTP 413);
- undecodable input is :class:`UnsupportedImage` (HTTP 415: not an image / unknown format) or
  :class:`InvalidImage` (HTTP 422: empty, truncated, corrupt).

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
CMYK, YCbCr, LAB, HSV, others       Pillow's ``convert("RGB")`` (no ICC colour management, like
                                    training's loader)
==================================  ===============================================================

The evaluation transform (:class:`EvalTransform`) is the one declared in model.json and used in
training (``training.augmentation.eval_transform``): resize the shorter side to ``resize_size``
with antialiased bicubic interpolation, centre crop ``image_size``, scale to 0..1, normalise with
mean/std, channels first. Pillow's bicubic resize is antialiased (its filter support grows with the
downscale factor) and PyTorch's antialiased bicubic was written to match it (a = -0.5, same support),
so the pixels agree to within a few grey levels (see tests/test_service_preprocess.py for the measured
difference on real photos). For extreme aspect ratios only the crop window is resampled (Pillow's
``box`` argument, same filter and scale), so that a 4000x4 strip never becomes a 73000x73 (or
256000x256) intermediate image.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

#: file extensions treated as images when a folder is scanned (training data, gallery builds)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".avif"})


def list_image_files(root: Path) -> list[Path]:
    """Image files below ``root`` (recursive, sorted so that every run sees the same order)."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())

Image.init()
#: Pillow formats accepted from clients: pure raster decoders (no plugin that runs external programs)
ACCEPTED_FORMATS = tuple(
    f for f in ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF") if f in Image.OPEN
)
WHITE = (255, 255, 255, 255)
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
UINT16_MAX = 65535.0
#: resized images up to this many crops in area are resized whole (exactly torchvision's computation);
#: larger ones (extreme aspect ratios, e.g. 4000x4 -> 73000x73) only have their crop window resampled
FULL_RESIZE_MAX_AREA = 16


class ImageInputError(Exception):
    """An image sent by a client cannot be used; ``status_code`` is the HTTP answer."""

    status_code = 422

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class ImageTooLarge(ImageInputError):
    """Too many pixels (decompression bomb, absurd header) or too many bytes."""

    status_code = 413


class UnsupportedImage(ImageInputError):
    """Not an image, or a format/pixel mode the service does not decode."""

    status_code = 415


class InvalidImage(ImageInputError):
    """An image format we know, but the data is empty, truncated or corrupt."""

    status_code = 422


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode untrusted bytes into an 8-bit RGB image (EXIF orientation applied, first frame).

    Raises :class:`ImageInputError` subclasses with a message fit for the client.
    """
    if not data:
        raise InvalidImage("empty file: no image data")
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedImage(
            f"not a supported image: the data is not one of {', '.join(ACCEPTED_FORMATS)}"
        ) from exc
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
    # Animated GIF/WebP/APNG and multi-page TIFF: Image.open is positioned on the first frame already;
    # seek(0) makes that explicit (and is a no-op for single-frame images).
    try:
        img.seek(0)
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large: {exc}") from exc
    except MemoryError as exc:
        raise ImageTooLarge("image too large to decode") from exc
    except Exception as exc:  # OSError "image file is truncated", ValueError for oversized chunks, ...
        raise InvalidImage(f"corrupt or truncated {img.format} image: {exc}") from exc
    try:
        return to_rgb(apply_exif_orientation(img))
    except ImageInputError:
        raise
    except MemoryError as exc:
        raise ImageTooLarge("image too large to convert") from exc
    except Exception as exc:  # a decoded image Pillow cannot convert (exotic mode/palette)
        raise InvalidImage(f"cannot convert the {img.mode} image to RGB: {exc}") from exc


def apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says (a photo taken in portrait is stored sideways).

    A malformed EXIF block is ignored (the pixels are still valid) rather than refused.
    """
    try:
        transposed = ImageOps.exif_transpose(img)
    except Exception as exc:  # malformed EXIF: Pillow raises various errors while parsing it
        log.debug("ignoring malformed EXIF data: %s", exc)
        return img
    return img if transposed is None else transposed


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale a single-channel 16-bit, 32-bit integer or float image to 0..255 (see the module table)."""
    v = values.astype(np.float64)
    finite = np.isfinite(v)
    v = np.where(finite, v, 0.0)  # NaN and +-inf carry no intensity: black
    if mode in SIXTEEN_BIT_MODES:
        scaled = v * (255.0 / UINT16_MAX)
    else:
        lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = v * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            scaled = v
        elif mode == "I" and lo >= 0.0 and hi <= UINT16_MAX:
            scaled = v * (255.0 / UINT16_MAX)
        elif hi > lo:
            scaled = (v - lo) * (255.0 / (hi - lo))
        else:
            scaled = np.zeros_like(v)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB as documented in the module's table."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        grey = _grey_to_uint8(np.asarray(img), mode)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.has_transparency_data:
        # Transparent pixels have no defined colour: composite them over white, like a browser page
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnsupportedImage(f"unsupported pixel mode {mode!r}") from exc


@dataclass(frozen=True)
class EvalTransform:
    """The model's evaluation transform: shorter side -> ``resize_size`` (bicubic, antialiased),
    centre crop ``image_size``, /255, (x - mean) / std, float32 [3, H, W].

    Sizes follow torchvision exactly: the longer side becomes ``int(resize_size * long / short)``
    and the crop's top-left corner is ``round((resized - crop) / 2)``; a crop larger than the resized
    image is padded with black, as torchvision's ``CenterCrop`` does.
    """

    image_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the shorter-side resize (torchvision's rule, truncating the long side)."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def crop(self, img: Image.Image) -> Image.Image:
        """Resize + centre crop of an RGB image: the ``image_size`` square the model sees (uint8 RGB)."""
        width, height = img.size
        new_w, new_h = self.resized_size(width, height)
        side = self.image_size
        # Per axis: the window of the resized image that lands in the crop, and where it lands
        x0, x1, paste_x = _crop_window(new_w, side)
        y0, y1, paste_y = _crop_window(new_h, side)
        if (new_w, new_h) == (width, height):
            window = img.crop((x0, y0, x1, y1))  # torchvision skips the resize when the size is unchanged
        elif new_w * new_h <= FULL_RESIZE_MAX_AREA * side * side:
            # the usual case: resize the whole image, then crop, exactly as torchvision does
            window = img.resize((new_w, new_h), Image.Resampling.BICUBIC).crop((x0, y0, x1, y1))
        else:
            # extreme aspect ratio: resample only the crop window (same filter and scale; the float
            # arithmetic of the window offset may move a few pixels by one grey level)
            scale_x, scale_y = width / new_w, height / new_h
            box = (x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y)
            window = img.resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC, box=box)
        if window.size == (side, side):
            return window
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        canvas.paste(window, (paste_x, paste_y))
        return canvas

    def normalize(self, crop: Image.Image) -> np.ndarray:
        """uint8 RGB crop -> normalised float32 [3, H, W], with torchvision's float32 arithmetic."""
        pixels = np.asarray(crop.convert("RGB"), dtype=np.float32) * np.float32(1.0 / 255.0)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))

    def __call__(self, img: Image.Image) -> np.ndarray:
        return self.normalize(self.crop(img))


def _crop_window(resized: int, side: int) -> tuple[int, int, int]:
    """(start, end, paste offset) along one axis of a centre crop of ``side`` from ``resized`` pixels.

    torchvision pads ``(side - resized) // 2`` pixels before when the crop is larger, else starts the
    crop at ``round((resized - side) / 2)`` (Python's round: ties to even, as torchvision).
    """
    if side > resized:
        return 0, resized, (side - resized) // 2
    start = int(round((resized - side) / 2.0))
    return start, start + side, 0


@dataclass
class PreparedImage:
    """A decoded client image: the model's view (uint8 crop, for overlays and thumbnails) and its input tensor."""

    crop: Image.Image
    tensor: np.ndarray


class Preprocessor:
    """bytes -> :class:`PreparedImage` for one model: safe decoding + the evaluation transform."""

    def __init__(self, transform: EvalTransform, max_pixels: int):
        self.transform = transform
        self.max_pixels = max_pixels

    @classmethod
    def for_model(cls, spec, max_pixels: int) -> "Preprocessor":
        """Build from a :class:`service.runtime.ModelSpec` (image_size, resize_size, mean, std)."""
        return cls(EvalTransform(spec.image_size, spec.resize_size, tuple(spec.mean), tuple(spec.std)), max_pixels)

    def prepare(self, data: bytes) -> PreparedImage:
        """Decode and transform one image (runs in a worker thread)."""
        crop = self.transform.crop(decode_image(data, self.max_pixels))
        return PreparedImage(crop=crop, tensor=self.transform.normalize(crop))

    def prepare_crop(self, crop: Image.Image) -> PreparedImage:
        """An image that is already the model's view (a stored gallery crop), resized if stored at another size."""
        side = self.transform.image_size
        crop = to_rgb(crop)
        if crop.size != (side, side):
            crop = crop.resize((side, side), Image.Resampling.BICUBIC)
        return PreparedImage(crop=crop, tensor=self.transform.normalize(crop))


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """JPEG bytes of an RGB image (gallery thumbnails)."""
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_thumbnail(crop: Image.Image, size: int | None, quality: int) -> bytes:
    """The stored gallery image: the model's crop (resized to ``size`` x ``size`` if given) as JPEG."""
    if size and crop.size != (size, size):
        crop = crop.resize((size, size), Image.Resampling.BICUBIC)
    return encode_jpeg(crop, quality)

