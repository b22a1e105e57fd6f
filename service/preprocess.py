"""The service's preprocessing: the model's evaluation transform with Pillow and NumPy only.

Decoding untrusted bytes (formats, size checks, EXIF, pixel modes) lives in :mod:`dino.images`,
shared with training; this module turns the decoded image into the model's input.

The evaluation transform (:class:`EvalTransform`) is the one declared in model.json and used in
training (``training.augmentation.eval_transform``): resize the shorter side to ``resize_size``
with antialiased bicubic interpolation, centre crop ``image_size``, scale to 0..1, normalise with
mean/std, channels first. Pillow's bicubic resize is antialiased (its filter support grows with the
downscale factor) and PyTorch's antialiased bicubic was written to match it (a = -0.5, same support),
so the pixels agree to within a few grey levels (see the service's preprocessing tests for the
measured difference on real photos). For extreme aspect ratios only the crop window is resampled
(Pillow's ``box`` argument, same filter and scale), so that a 4000x4 strip never becomes a 73000x73
(or 256000x256) intermediate image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dino.images import DEFAULT_MAX_JPEG_SCANS, decode_image, to_rgb

#: resized images up to this many crops in area are resized whole (exactly torchvision's computation);
#: larger ones (extreme aspect ratios, e.g. 4000x4 -> 73000x73) only have their crop window resampled
FULL_RESIZE_MAX_AREA = 16


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
    mean: tuple[float, ...]  #: per RGB channel (3 values)
    std: tuple[float, ...]  #: per RGB channel (3 values)

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

    def __init__(self, transform: EvalTransform, max_pixels: int, max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS):
        self.transform = transform
        self.max_pixels = max_pixels
        self.max_jpeg_scans = max_jpeg_scans

    @classmethod
    def for_model(cls, spec, max_pixels: int, max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS) -> Preprocessor:
        """Build from a :class:`service.runtime.ModelSpec` (image_size, resize_size, mean, std)."""
        transform = EvalTransform(spec.image_size, spec.resize_size, tuple(spec.mean), tuple(spec.std))
        return cls(transform, max_pixels, max_jpeg_scans)

    def prepare(self, data: bytes) -> PreparedImage:
        """Decode and transform one image (runs in a worker thread)."""
        crop = self.transform.crop(decode_image(data, self.max_pixels, self.max_jpeg_scans))
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
