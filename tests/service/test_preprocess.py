"""Preprocessing of the service (Pillow + NumPy): safe decoding, mode conversions, and parity with
the training evaluation transform (torchvision) on real photos."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dino.images import ImageTooLarge, InvalidImage, UnsupportedImage, decode_image, to_rgb
from service.preprocess import EvalTransform, Preprocessor
from service.runtime import OnnxModel
from tests.service.images import (
    encode,
    photo,
    photo_bytes,
    photo_paths,
    png_bomb,
    with_jpeg_dimensions,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LIMIT = 40_000_000


# Pillow warns about the bomb before our own header check refuses it
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decode_refuses_bad_data_with_the_right_error():
    jpeg = photo_bytes(0)
    with pytest.raises(InvalidImage, match="empty"):
        decode_image(b"", LIMIT)
    with pytest.raises(UnsupportedImage):
        decode_image(b"this is plain text, not an image", LIMIT)
    with pytest.raises(UnsupportedImage):
        decode_image(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', LIMIT)
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(jpeg[: len(jpeg) // 2], LIMIT)
    # header claims checked before any pixel is decoded: over our limit, and over Pillow's own
    with pytest.raises(ImageTooLarge, match="8000x8000"):
        decode_image(with_jpeg_dimensions(jpeg, 8000, 8000), LIMIT)
    with pytest.raises(ImageTooLarge):
        decode_image(with_jpeg_dimensions(jpeg, 65000, 65000), LIMIT)
    with pytest.raises(ImageTooLarge, match="12000x12000"):
        decode_image(png_bomb(12000), LIMIT)


def test_mode_conversions_follow_the_documented_rules():
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = np.repeat(grey[..., None], 3, axis=2)

    def rgb_of(img: Image.Image) -> np.ndarray:
        return np.asarray(to_rgb(img))

    assert np.array_equal(rgb_of(Image.fromarray(grey)), expected)
    # 16-bit: v * 255 / 65535
    assert Image.fromarray(grey.astype(np.uint16)).mode == "I;16"
    assert np.array_equal(rgb_of(Image.fromarray(grey.astype(np.uint16) * 257)), expected)
    # float in 0..1: * 255; float outside 0..255: min-max stretched; NaN -> 0
    assert np.array_equal(rgb_of(Image.fromarray(grey.astype(np.float32) / 255)), expected)
    stretched = rgb_of(Image.fromarray(grey.astype(np.float32) * 1000 - 5000))
    assert stretched.min() == 0 and stretched.max() == 255
    with_nan = grey.astype(np.float32) / 255
    with_nan[0, 1] = np.nan
    assert rgb_of(Image.fromarray(with_nan))[0, 1].tolist() == [0, 0, 0]
    # 32-bit integer holding 16-bit data: scaled like 16-bit
    assert np.array_equal(rgb_of(Image.fromarray(grey.astype(np.int32) * 257)), expected)
    # alpha composited on white: fully transparent -> white, half transparent black -> mid grey
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2, :, 3] = 0
    rgba[2:, :, 3] = 128
    out = rgb_of(Image.fromarray(rgba, "RGBA"))
    assert (out[:2] == 255).all() and (np.abs(out[2:].astype(int) - 127) <= 1).all()
    la = rgb_of(Image.fromarray(np.stack([np.zeros((4, 4)), np.full((4, 4), 0)], -1).astype(np.uint8), "LA"))
    assert (la == 255).all()
    # palette with a transparent index -> that colour becomes white
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 0
    assert rgb_of(palette).tolist() == [[[255, 255, 255], [0, 0, 255]], [[0, 0, 255], [255, 255, 255]]]
    # mode 1 -> 0 / 255; CMYK -> Pillow's conversion
    assert set(np.unique(rgb_of(Image.fromarray(grey > 127).convert("1")))) == {0, 255}
    assert rgb_of(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).tolist()[0][0] == [255, 0, 0]


def test_decode_applies_exif_orientation_and_takes_the_first_frame():
    base = photo(0).resize((48, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    tagged = encode(base, "PNG", exif=exif.tobytes())  # lossless, so pixels can be compared exactly
    decoded = decode_image(tagged, LIMIT)
    assert decoded.size == (32, 48)
    assert np.array_equal(np.asarray(decoded), np.asarray(base.transpose(Image.Transpose.ROTATE_270)))

    first, second = Image.new("RGB", (8, 8), (250, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 250))
    gif = encode(first, "GIF", save_all=True, append_images=[second], duration=50, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    pixels = np.asarray(decode_image(gif, LIMIT))
    assert pixels[..., 0].min() > 200 and pixels[..., 2].max() < 50


def test_crop_follows_torchvision_sizes_and_padding():
    t = EvalTransform(64, 73, MEAN, STD)
    assert t.resized_size(500, 375) == (97, 73)  # int(73 * 500 / 375) = 97
    assert t.resized_size(375, 500) == (73, 97)
    assert t.resized_size(1, 1) == (73, 73)
    assert t.resized_size(4000, 4) == (73000, 73)
    for size in [(1, 1), (4000, 4), (4, 4000), (97, 73), (73, 73)]:
        assert t.crop(Image.new("RGB", size, (10, 200, 30))).size == (64, 64)
    # resize smaller than the crop: padded with black around the centre, as torchvision's CenterCrop
    padded = np.asarray(EvalTransform(8, 4, MEAN, STD).crop(Image.new("RGB", (4, 4), (255, 255, 255))))
    assert padded[2:6, 2:6].min() == 255 and padded[0].max() == 0 and padded[:, 7].max() == 0


def test_extreme_aspect_ratio_crop_window_matches_a_full_resize():
    """The crop-window shortcut used for extreme aspect ratios resamples like the full resize."""
    rng = np.random.default_rng(0)
    strip = Image.fromarray(rng.integers(0, 256, (6, 3000, 3), dtype=np.uint8))
    t = EvalTransform(64, 73, MEAN, STD)
    new_w, new_h = t.resized_size(*strip.size)
    full = strip.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = int(round((new_w - 64) / 2)), int(round((new_h - 64) / 2))
    reference = np.asarray(full.crop((left, top, left + 64, top + 64)), dtype=int)
    assert np.abs(np.asarray(t.crop(strip), dtype=int) - reference).max() <= 2


@pytest.mark.parametrize("image_size,resize_size", [(64, 73), (224, 256)])
def test_pixels_match_torchvision_eval_transform(image_size, resize_size):
    """Service preprocessing vs training.augmentation.eval_transform on 20 real photos, in grey levels.

    Pillow and PyTorch's uint8 antialiased bicubic share the filter (a = -0.5, support scaled by the
    downscale factor) but not every rounding step: a few pixels differ by one or two levels."""
    pytest.importorskip("torchvision")
    from dino.images import load_rgb
    from training.augmentation import eval_transform

    reference_transform = eval_transform(image_size, resize_size)
    service_transform = EvalTransform(image_size, resize_size, MEAN, STD)
    std, mean = np.array(STD)[:, None, None], np.array(MEAN)[:, None, None]
    worst, differing, total = 0, 0, 0
    for path in photo_paths()[:20]:
        reference = reference_transform(load_rgb(path)).numpy()
        ours = service_transform(decode_image(path.read_bytes(), LIMIT))
        assert ours.shape == reference.shape == (3, image_size, image_size) and ours.dtype == np.float32
        levels = np.abs(np.rint((ours * std + mean) * 255) - np.rint((reference * std + mean) * 255))
        worst = max(worst, int(levels.max()))
        differing += int((levels > 0).sum())
        total += levels.size
    print(
        f"\n[{image_size}/{resize_size}] service vs torchvision pixels: max {worst} grey levels, "
        f"{100 * differing / total:.3f}% of values differ"
    )
    assert worst <= 2
    assert differing / total < 0.01


def test_embeddings_match_torchvision_eval_transform(model_dir):
    """The parity that matters: L2-normalised embeddings of real photos, preprocessed by the service
    vs by the training eval transform, through the same ONNX model."""
    pytest.importorskip("torchvision")
    from dino.images import load_rgb
    from training.augmentation import eval_transform

    model = OnnxModel(model_dir, provider="cpu")
    spec = model.spec
    preprocessor = Preprocessor.for_model(spec, LIMIT)
    reference_transform = eval_transform(spec.image_size, spec.resize_size, spec.mean, spec.std)
    paths = photo_paths()[:24]
    ours = np.stack([preprocessor.prepare(p.read_bytes()).tensor for p in paths])
    theirs = np.stack([reference_transform(load_rgb(p)).numpy() for p in paths])

    def embed(batch):
        e = model.run(batch, ["embedding"])["embedding"]
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    diff = np.abs(embed(ours) - embed(theirs)).max()
    print(
        f"\nservice vs torchvision preprocessing: max abs difference of L2-normalised embeddings {diff:.2e} "
        f"({len(paths)} photos, {spec.image_size} px)"
    )
    assert diff < 1e-2
