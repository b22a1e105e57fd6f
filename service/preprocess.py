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

A JPEG much larger than the resize is decoded at a reduced scale (:func:`dino.images.decode_image_reduced`,
libjpeg's DCT scaling by 1/2, 1/4 or 1/8) whose shorter side stays at least
:data:`REDUCED_DECODE_MARGIN` times ``resize_size``: the antialiased bicubic resize still does most of
the downscaling, from the true geometry of the full-size image (the resize follows the full size and
samples the reduced image through its box), so the crop stays within a few grey levels of the full
decode and the embeddings at a cosine above 0.9999 to the full decode's (``benchmarks/draft_decode.py``
measures both, and the k-NN, on real photos), for a fraction of the decode and resize time.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dino.images import DEFAULT_MAX_JPEG_SCANS, decode_image_reduced, to_rgb

#: resized images up to this many crops in area are resized whole (exactly torchvision's computation);
#: larger ones (extreme aspect ratios, e.g. 4000x4 -> 73000x73) only have their crop window resampled
FULL_RESIZE_MAX_AREA = 16
#: a JPEG is decoded at a reduced scale only while its shorter side stays at least this many times the
#: resize (``resize_size``): the reduction then leaves at least a 2x antialiased downscale to the resize
REDUCED_DECODE_MARGIN = 2.0


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

    def crop(
        self,
        img: Image.Image,
        full_size: tuple[int, int] | None = None,
        box: tuple[float, float, float, float] | None = None,
    ) -> Image.Image:
        """Resize + centre crop of an RGB image: the ``image_size`` square the model sees (uint8 RGB).

        ``full_size`` and ``box`` describe a reduced decode (:class:`dino.images.DecodedImage`): the
        sizes follow the full-size image, and the resize samples ``img`` through ``box`` (where the
        full image lies in it), so that the crop shows what the full decode's crop shows.
        """
        width, height = full_size or img.size
        box = box or (0.0, 0.0, float(img.size[0]), float(img.size[1]))  # Pillow's default: the whole image
        new_w, new_h = self.resized_size(width, height)
        side = self.image_size
        # Per axis: the window of the resized image that lands in the crop, and where it lands
        x0, x1, paste_x = _crop_window(new_w, side)
        y0, y1, paste_y = _crop_window(new_h, side)
        if (new_w, new_h) == (width, height) == img.size:
            window = img.crop((x0, y0, x1, y1))  # torchvision skips the resize when the size is unchanged
        elif new_w * new_h <= FULL_RESIZE_MAX_AREA * side * side:
            # the usual case: resize the whole image, then crop, exactly as torchvision does
            window = img.resize((new_w, new_h), Image.Resampling.BICUBIC, box=box).crop((x0, y0, x1, y1))
        else:
            # extreme aspect ratio: resample only the crop window (same filter and scale; the float
            # arithmetic of the window offset may move a few pixels by one grey level)
            left, top, right, bottom = box
            scale_x, scale_y = (right - left) / new_w, (bottom - top) / new_h
            window_box = (left + x0 * scale_x, top + y0 * scale_y, left + x1 * scale_x, top + y1 * scale_y)
            window = img.resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC, box=window_box)
        if window.size == (side, side):
            return window
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        canvas.paste(window, (paste_x, paste_y))
        return canvas

    def normalize(self, crop: Image.Image) -> np.ndarray:
        """uint8 RGB crop -> normalised float32 [3, H, W], with torchvision's float32 arithmetic."""
        rgb = crop if crop.mode == "RGB" else crop.convert("RGB")
        pixels = np.asarray(rgb, dtype=np.float32) * np.float32(1.0 / 255.0)
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
    """bytes -> :class:`PreparedImage` for one model: safe decoding + the evaluation transform.

    A JPEG is decoded at the smallest reduced scale that keeps its shorter side at least
    ``reduced_decode_margin`` x ``resize_size`` (so only JPEGs at least twice that large are reduced;
    see the module's docstring); ``reduced_decode_margin=0`` decodes every image at full size.
    """

    def __init__(
        self,
        transform: EvalTransform,
        max_pixels: int,
        max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
        reduced_decode_margin: float = REDUCED_DECODE_MARGIN,
    ):
        self.transform = transform
        self.max_pixels = max_pixels
        self.max_jpeg_scans = max_jpeg_scans
        #: shorter side (pixels) a reduced decode keeps at least; 0: always decode at full size
        target = max(transform.resize_size, transform.image_size)
        self.min_decoded_side = math.ceil(reduced_decode_margin * target) if reduced_decode_margin > 0 else 0

    @classmethod
    def for_model(cls, spec, max_pixels: int, max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS) -> Preprocessor:
        """Build from a :class:`service.runtime.ModelSpec` (image_size, resize_size, mean, std)."""
        transform = EvalTransform(spec.image_size, spec.resize_size, tuple(spec.mean), tuple(spec.std))
        return cls(transform, max_pixels, max_jpeg_scans)

    def prepare(self, data: bytes) -> PreparedImage:
        """Decode and transform one image (runs in a worker thread)."""
        decoded = decode_image_reduced(data, self.max_pixels, self.min_decoded_side, self.max_jpeg_scans)
        crop = self.transform.crop(decoded.image, decoded.full_size, decoded.box)
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
