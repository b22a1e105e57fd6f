"""Multi-crop augmentation: crop shapes and normalisation, and the paper's blur on every crop (one
scale factor, global size / 224)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from training.augmentation import MultiCropAugmentation, blur_kernel, blur_sigma


def test_augmentation_shapes(sample_photos):
    aug = MultiCropAugmentation(global_size=64, local_size=32, local_crops=5)
    image = Image.open(sample_photos[0]).convert("RGB")
    crops = aug(image)
    assert len(crops) == aug.ncrops == 7
    assert all(c.shape == (3, 64, 64) for c in crops[:2])
    assert all(c.shape == (3, 32, 32) for c in crops[2:])
    assert all(c.dtype == torch.float32 for c in crops)
    # normalised with ImageNet statistics: roughly zero-centred, not in [0, 1]
    assert crops[0].min() < 0 < crops[0].max()
    assert not torch.equal(crops[0], crops[1])


def _blurs(pipeline) -> list:
    """The GaussianBlur transforms of a pipeline (Compose and RandomApply keep children in a list)."""
    from torchvision.transforms import v2

    def walk(transform):
        yield transform
        for child in getattr(transform, "transforms", []):
            yield from walk(child)

    return [t for t in walk(pipeline) if isinstance(t, v2.GaussianBlur)]


@pytest.mark.parametrize("global_size,local_size", [(224, 96), (64, 32), (32, 16), (128, 64)])
def test_every_crop_gets_the_papers_blur_scaled_by_the_global_size(global_size, local_size):
    """Caron et al. 2021 draw sigma from 0.1-2.0 px for the 224 px global and the 96 px local crops
    alike; at another resolution both are scaled by global size / 224, the local crops too."""
    aug = MultiCropAugmentation(global_size=global_size, local_size=local_size, local_crops=1)
    scale = global_size / 224
    for pipeline, side in ((aug.global1, global_size), (aug.global2, global_size), (aug.local, local_size)):
        (blur,) = _blurs(pipeline)
        assert blur.sigma == pytest.approx([0.1 * scale, 2.0 * scale])
        kernel = blur.kernel_size[0]
        assert kernel % 2 == 1 and 3 <= kernel <= max(side, 3)


def test_paper_recipe_gets_exactly_the_papers_blur():
    aug = MultiCropAugmentation(global_size=224, local_size=96, local_crops=1)
    for pipeline in (aug.global1, aug.global2, aug.local):
        (blur,) = _blurs(pipeline)
        assert blur.sigma == pytest.approx([0.1, 2.0])
        assert list(blur.kernel_size) == [23, 23]  # BYOL's kernel, 5.5 sigma at the top of the range
    assert blur_sigma(224) == pytest.approx((0.1, 2.0))


def test_blur_kernel_is_odd_and_fits_small_crops():
    assert blur_kernel(224, 224) == 23
    assert blur_kernel(224, 16) == 15  # capped to the crop side, kept odd
    assert blur_kernel(32, 16) == 3  # never below 3
    assert blur_kernel(32, 2) == 3
    for global_size in range(16, 512, 8):
        for crop in (global_size // 4, global_size // 2, global_size):
            k = blur_kernel(global_size, crop)
            assert k % 2 == 1 and k >= 3
