"""Multi-crop augmentation: crop shapes and normalisation, and the blur scaled to the crop side."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from training.augmentation import MultiCropAugmentation, blur_sigma


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


def test_blur_is_scaled_to_the_crop_side():
    """The paper's sigma 0.1-2.0 px is for 224 px crops; a 64 px crop gets the same relative blur."""
    from torchvision.transforms import v2

    def walk(transform):  # Compose and RandomApply keep their children in a plain list
        yield transform
        for child in getattr(transform, "transforms", []):
            yield from walk(child)

    assert blur_sigma(224) == pytest.approx((0.1, 2.0))
    aug = MultiCropAugmentation(global_size=64, local_size=32, local_crops=1)
    for pipeline, size in ((aug.global1, 64), (aug.global2, 64), (aug.local, 32)):
        blurs = [t for t in walk(pipeline) if isinstance(t, v2.GaussianBlur)]
        assert len(blurs) == 1
        assert blurs[0].sigma == pytest.approx(list(blur_sigma(size)))
        assert blurs[0].sigma[1] == pytest.approx(2.0 * size / 224)
