"""Vision Transformer backbones from timm, configured for DINO.

DINO trains ViT-Tiny/Small/Base (Touvron et al. / Dosovitskiy et al.) with patch sizes 16 or 8; for
32 px images (CIFAR-10) a patch size of 4 keeps a useful token grid. The backbone returns the
[CLS] token after the final LayerNorm, which is the feature DINO uses for k-NN and linear evaluation.
Local crops run through the same network: timm's ``dynamic_img_size`` interpolates the position
embeddings to whatever grid the input has.
"""

from __future__ import annotations

from typing import cast

import timm
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

#: arch name -> timm model name (the patch size and image size are overridden at build time)
ARCHS: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}
PATCH_SIZES = (4, 8, 16)


def check_backbone_args(arch: str, patch_size: int, img_size: int) -> None:
    """Raise ValueError unless ``build_backbone`` can build this architecture, patch size and image size."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(sorted(ARCHS))}")
    if patch_size not in PATCH_SIZES:
        raise ValueError(f"patch size must be one of {PATCH_SIZES}, got {patch_size}")
    if img_size % patch_size:
        raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")


def build_backbone(arch: str, patch_size: int, img_size: int, drop_path_rate: float = 0.0) -> VisionTransformer:
    """Build a randomly initialised timm ViT that maps images to their [CLS] embedding.

    Never downloads weights: pretrained weights come in through ``dino import`` from local files.
    """
    check_backbone_args(arch, patch_size, img_size)
    model = timm.create_model(
        ARCHS[arch],
        pretrained=False,
        num_classes=0,  # no classifier: forward() returns the normalised [CLS] token
        patch_size=patch_size,
        img_size=img_size,
        dynamic_img_size=True,  # local crops: position embeddings interpolated to their grid
        drop_path_rate=drop_path_rate,
    )
    return cast(VisionTransformer, model)  # timm types create_model as returning any Module


def set_fused_attention(model: nn.Module, enabled: bool) -> None:
    """Switch timm's fused ``scaled_dot_product_attention`` on or off in every attention block.

    On the CPU, for the short token sequences of DINO's crops (65 and 17 tokens at 32/16 px with
    patch 4), the explicit softmax(QK^T)V path trains faster than the fused kernel, whose backward
    pass dominates (measured by ``benchmarks/train_throughput.py``); on CUDA the fused kernel wins.
    """
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled  # type: ignore[assignment]  # a flag of timm's Attention, not a submodule
