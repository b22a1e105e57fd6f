"""Multi-crop augmentation of DINO (Caron et al. 2021, Sec. 3.1 and Appendix; after BYOL/SwAV).

Each image yields 2 global crops (scale 0.4-1) and N local crops (scale 0.05-0.4), each with a
horizontal flip, colour jitter (p 0.8), grayscale (p 0.2) and Gaussian blur (p 1.0 for the first
global, 0.1 for the second, 0.5 for the locals); the second global view is also solarised (p 0.2).
The asymmetric blur/solarisation follows BYOL: the two global views are made deliberately different.

The paper's blur is defined for its recipe, global crops of 224 px and local crops of 96 px: sigma
0.1-2.0 px on every crop, local ones included (PIL's GaussianBlur in the reference), with BYOL's
kernel of 23 px (a tenth of 224). Runs at another resolution scale both by one factor, the global
crop side / 224, applied to every crop: the paper's recipe gets exactly the paper's values, and a
64/32 px recipe gets the blur of the 224/112 px one, shrunk with its images. (Scaling each crop by
its own side instead would make the 96 px local crops of the paper recipe 2.3x less blurred than
the paper's.) The kernel is odd, at least 3 px and at most the crop side.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

#: ImageNet statistics, used by DINO for every dataset
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: side of the global crops at which the paper's blur parameters are given
PAPER_SIZE = 224
#: Gaussian blur sigma range in pixels at PAPER_SIZE, for global and local crops alike (BYOL / DINO)
PAPER_BLUR_SIGMA = (0.1, 2.0)
#: blur kernel side at PAPER_SIZE (BYOL: a tenth of the image side, odd), i.e. 5.5 sigma at the top
PAPER_BLUR_KERNEL = 23
#: the smallest odd kernel that blurs at all
MIN_BLUR_KERNEL = 3


def blur_scale(global_size: int) -> float:
    """The one factor by which every crop's blur is scaled: global crop side / 224."""
    return global_size / PAPER_SIZE


def blur_sigma(global_size: int) -> tuple[float, float]:
    """The paper's sigma range scaled by :func:`blur_scale`; the same for the global and local crops."""
    scale = blur_scale(global_size)
    return PAPER_BLUR_SIGMA[0] * scale, PAPER_BLUR_SIGMA[1] * scale


def blur_kernel(global_size: int, crop_size: int) -> int:
    """The paper's 23 px kernel scaled by :func:`blur_scale`, odd, within [3, crop side]."""
    k = max(MIN_BLUR_KERNEL, round(PAPER_BLUR_KERNEL * blur_scale(global_size)))
    k = min(k, crop_size)  # a kernel wider than the crop only adds padding
    return k if k % 2 else k - 1 if k > MIN_BLUR_KERNEL else MIN_BLUR_KERNEL


class MultiCropAugmentation:
    """Callable: PIL image -> list of ``2 + local_crops`` float tensors (globals first).

    Args:
        global_size: side of the global crops (224 in the paper).
        local_size: side of the local crops (96 in the paper).
        local_crops: number of local crops N (8 in the paper; 0 disables multi-crop).
        global_scale / local_scale: area ranges of RandomResizedCrop.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        local_crops: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ):
        self.local_crops = local_crops
        flip_and_jitter = [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        to_tensor = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=mean, std=std)]

        def crop(size: int, scale: tuple[float, float]) -> v2.Transform:
            return v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True)

        def blur(size: int, p: float) -> v2.Transform:
            # one sigma range for every crop, set by the global size (module docstring)
            kernel = blur_kernel(global_size, size)
            return v2.RandomApply([v2.GaussianBlur(kernel, sigma=blur_sigma(global_size))], p=p)

        self.global1 = v2.Compose(
            [v2.PILToTensor(), crop(global_size, global_scale), *flip_and_jitter, blur(global_size, 1.0), *to_tensor]
        )
        self.global2 = v2.Compose(
            [
                v2.PILToTensor(),
                crop(global_size, global_scale),
                *flip_and_jitter,
                blur(global_size, 0.1),
                v2.RandomSolarize(threshold=128, p=0.2),
                *to_tensor,
            ]
        )
        self.local = v2.Compose(
            [v2.PILToTensor(), crop(local_size, local_scale), *flip_and_jitter, blur(local_size, 0.5), *to_tensor]
        )

    @property
    def ncrops(self) -> int:
        return 2 + self.local_crops

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global1(image), self.global2(image)]
        crops.extend(self.local(image) for _ in range(self.local_crops))
        return crops


def eval_transform(image_size: int, resize_size: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    """The evaluation transform (k-NN, export parity): resize shorter side, centre crop, normalise.

    The paper resizes to 256 and crops 224 (ratio 8/7); ``resize_size`` defaults to that ratio.
    """
    resize_size = resize_size or round(image_size * 8 / 7)
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(resize_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=mean, std=std),
        ]
    )
