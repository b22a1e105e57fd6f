"""Reduced-scale JPEG decoding (libjpeg's DCT scaling through ``Image.draft``) for the service's
preprocessing: what it decodes, that the model's crop stays that of the full decode on real photos,
and that the header checks, the EXIF orientation and the other formats are as before.

``benchmarks/draft_decode.py`` measures the same equivalence on embeddings and k-NN with the shipped model.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import service.preprocess as preprocess_module
from dino.images import ImageTooLarge, decode_image, decode_image_reduced, transpose_box
from service.preprocess import REDUCED_DECODE_MARGIN, EvalTransform, Preprocessor
from service.runtime import OnnxModel
from tests.service.hostile_images import many_scan_jpeg
from tests.service.images import encode, exif_rotated_jpeg, photo, photo_paths, with_jpeg_dimensions

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LIMIT = 40_000_000
#: the shipped default model's transform (models/dino-vit-tiny8-imagenette-cpu)
DEFAULT = EvalTransform(64, 73, MEAN, STD)
#: the shorter side a reduced decode keeps for it: 2 x 73
MIN_SIDE = 146


def crops(data: bytes, transform: EvalTransform = DEFAULT) -> tuple[np.ndarray, np.ndarray]:
    """The model's uint8 crop of ``data``: full decode, and the service's (reduced where it applies)."""
    full = Preprocessor(transform, LIMIT, reduced_decode_margin=0).prepare(data).crop
    served = Preprocessor(transform, LIMIT).prepare(data).crop
    return np.asarray(full, dtype=np.int16), np.asarray(served, dtype=np.int16)


def test_the_service_decodes_a_large_jpeg_at_a_reduced_scale(monkeypatch):
    """A full-size photo is decoded at 1/2, 1/4 or 1/8 of its size, never below 2 x resize_size."""
    assert REDUCED_DECODE_MARGIN == 2.0
    assert Preprocessor(DEFAULT, LIMIT).min_decoded_side == MIN_SIDE
    assert Preprocessor(EvalTransform(224, 256, MEAN, STD), LIMIT).min_decoded_side == 512
    assert Preprocessor(DEFAULT, LIMIT, reduced_decode_margin=0).min_decoded_side == 0

    decoded_sizes: list[tuple[tuple[int, int], tuple[int, int]]] = []
    real = preprocess_module.decode_image_reduced

    def spy(*args, **kwargs):
        decoded = real(*args, **kwargs)
        decoded_sizes.append((decoded.image.size, decoded.full_size))
        return decoded

    monkeypatch.setattr(preprocess_module, "decode_image_reduced", spy)
    big = encode(photo(0).resize((2400, 1800), Image.Resampling.BICUBIC), "JPEG", quality=90)
    Preprocessor(DEFAULT, LIMIT).prepare(big)
    assert decoded_sizes[-1] == ((300, 225), (2400, 1800))  # 1/8: 225 >= 146
    Preprocessor(DEFAULT, LIMIT).prepare(photo_paths()[0].read_bytes())  # a 500x375 ImageNet photo
    assert decoded_sizes[-1] == ((250, 188), (500, 375))  # 1/2: 188 >= 146 (375 / 4 would be < 146)
    Preprocessor(DEFAULT, LIMIT, reduced_decode_margin=0).prepare(big)
    assert decoded_sizes[-1] == ((2400, 1800), (2400, 1800))

    for side, scale in [(291, 1), (292, 2), (583, 2), (584, 4), (1168, 8), (4000, 8)]:
        data = encode(Image.new("RGB", (side + 7, side), (90, 120, 30)), "JPEG")
        decoded = decode_image_reduced(data, LIMIT, MIN_SIDE)
        assert decoded.full_size == (side + 7, side)
        assert decoded.image.size == (-(-(side + 7) // scale), -(-side // scale)), side
        assert min(decoded.image.size) >= MIN_SIDE
        assert decoded.box == (0.0, 0.0, (side + 7) / scale, side / scale)
        assert decoded.image.mode == "RGB"


def test_reduced_decode_crops_match_the_full_decode_on_real_photos():
    """The crop the model sees, on the ImageNet sample photos: within a few grey levels of the full decode."""
    worst, means, reduced = 0, [], 0
    for path in photo_paths()[:40]:
        data = path.read_bytes()
        reduced += decode_image_reduced(data, LIMIT, MIN_SIDE).reduced
        full, served = crops(data)
        assert full.shape == served.shape == (64, 64, 3)
        diff = np.abs(full - served)
        worst, means = max(worst, int(diff.max())), [*means, float(diff.mean())]
    print(f"\nreduced vs full decode, {reduced}/40 photos reduced: max {worst} grey levels, mean {np.mean(means):.3f}")
    assert reduced >= 30  # most ImageNet photos are >= 292 px on their shorter side
    assert worst <= 16
    assert np.mean(means) < 1.0


def test_reduced_decode_tensors_and_embeddings_match_the_full_decode(model_dir):
    model = OnnxModel(model_dir, provider="cpu")
    transform = EvalTransform(model.spec.image_size, model.spec.resize_size, MEAN, STD)
    full = Preprocessor(transform, LIMIT, reduced_decode_margin=0)
    served = Preprocessor(transform, LIMIT)
    paths = photo_paths()[:24]
    a = np.stack([full.prepare(p.read_bytes()).tensor for p in paths])
    b = np.stack([served.prepare(p.read_bytes()).tensor for p in paths])
    assert np.abs(a - b).max() < 16 / 255 / min(STD)

    def embed(batch):
        e = model.run(batch, ["embedding"])["embedding"]
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    cosine = (embed(a) * embed(b)).sum(axis=1)
    print(f"\nreduced vs full decode: embedding cosine min {cosine.min():.5f}, mean {cosine.mean():.5f}")
    assert cosine.min() > 0.995


def test_an_extreme_aspect_ratio_is_reduced_and_crops_like_the_full_decode():
    """The crop-window resize (a 6001x301 strip) samples the reduced image through its box too."""
    strip = photo(5).resize((6001, 301), Image.Resampling.BICUBIC)
    for img in (strip, strip.transpose(Image.Transpose.ROTATE_90)):
        data = encode(img, "JPEG", quality=95)
        assert decode_image_reduced(data, LIMIT, MIN_SIDE).reduced
        full, served = crops(data)
        assert np.abs(full - served).max() <= 12
        assert np.abs(full - served).mean() < 2.0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_exif_rotated_jpeg_is_reduced_and_oriented_like_the_full_decode(orientation):
    """The reduced size and the box turn with the image: the crop is the full decode's. The sides
    (1201x803) are no multiple of 4, so the box is off the image's edge on the rotated side."""
    data = exif_rotated_jpeg(photo(3).resize((1201, 803), Image.Resampling.BICUBIC), orientation)
    upright = decode_image(data, LIMIT)
    decoded = decode_image_reduced(data, LIMIT, MIN_SIDE)
    swapped = orientation >= 5
    assert upright.size == ((803, 1201) if swapped else (1201, 803))
    assert decoded.full_size == upright.size
    assert decoded.image.size == ((201, 301) if swapped else (301, 201))  # 1/4
    left, top, right, bottom = decoded.box
    assert (right - left, bottom - top) == pytest.approx((upright.size[0] / 4, upright.size[1] / 4))
    full, served = crops(data)
    assert np.abs(full - served).max() <= 8
    assert np.abs(full - served).mean() < 1.0


def test_transpose_box_follows_pillow():
    """Where a marked region lands after each of Pillow's transpositions."""
    size, box = (7, 5), (1, 2, 4, 3)
    marked = Image.new("L", size, 0)
    marked.paste(255, box)
    for method in Image.Transpose:
        expected = marked.transpose(method).getbbox()
        assert transpose_box(tuple(float(v) for v in box), size, method) == expected, method


def test_other_formats_and_small_jpegs_are_decoded_at_full_size():
    base = photo(1).resize((900, 700), Image.Resampling.BICUBIC)
    for data in (encode(base, "PNG"), encode(base, "WEBP", lossless=True), encode(base, "BMP")):
        decoded = decode_image_reduced(data, LIMIT, MIN_SIDE)
        assert not decoded.reduced and decoded.image.size == (900, 700) and decoded.box == (0, 0, 900, 700)
        assert np.array_equal(np.asarray(decoded.image), np.asarray(decode_image(data, LIMIT)))
        full, served = crops(data)
        assert np.array_equal(full, served)
    small = encode(base.resize((291, 250)), "JPEG")  # 250 < 2 x 146: no reduction
    assert decode_image_reduced(small, LIMIT, MIN_SIDE).image.size == (291, 250)
    full, served = crops(small)
    assert np.array_equal(full, served)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_header_checks_apply_to_the_full_size():
    """The pixel limit and the scan limit are the header's, whatever the reduction would decode."""
    jpeg = photo_paths()[0].read_bytes()
    preprocessor = Preprocessor(DEFAULT, LIMIT)
    with pytest.raises(ImageTooLarge, match="8000x8000"):  # 1/8 would be 1000x1000, under the limit
        decode_image_reduced(with_jpeg_dimensions(jpeg, 8000, 8000), LIMIT, MIN_SIDE)
    with pytest.raises(ImageTooLarge, match="8000x8000"):
        preprocessor.prepare(with_jpeg_dimensions(jpeg, 8000, 8000))
    small_limit = Preprocessor(DEFAULT, max_pixels=500 * 375 - 1)
    with pytest.raises(ImageTooLarge, match="500x375"):  # decoded at 250x188, but 500x375 is over
        small_limit.prepare(jpeg)
    with pytest.raises(ImageTooLarge, match="3000 scans"):
        preprocessor.prepare(many_scan_jpeg(side=2000, scans=3000))


def test_an_mpo_is_reduced_like_a_jpeg():
    base = photo(2).resize((1201, 803), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    base.save(buffer, "MPO", save_all=True, append_images=[base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    decoded = decode_image_reduced(data, LIMIT, MIN_SIDE)
    assert decoded.image.size == (301, 201) and decoded.full_size == (1201, 803)
    full, served = crops(data)
    assert np.abs(full - served).max() <= 8
