"""The network: the DINO projection head, the multi-crop wrapper and the ViT backbones."""

from __future__ import annotations

import pytest
import torch

from training.backbone import build_backbone
from training.head import DINOHead
from training.multicrop import MultiCropWrapper


def test_head_shapes_and_frozen_norm():
    head = DINOHead(192, out_dim=1000, use_bn=True, norm_last_layer=True)
    out = head(torch.randn(6, 192))
    assert out.shape == (6, 1000)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    # the bottleneck is L2-normalised, so with unit-norm rows |logit| <= 1
    assert out.abs().max() <= 1.0 + 1e-5
    assert DINOHead(192, 1000, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_multicrop_wrapper_runs_local_crops_through_the_same_backbone():
    backbone = build_backbone("vit_tiny", 4, 32)
    model = MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, 64, hidden_dim=32, bottleneck_dim=16))
    crops = [torch.randn(3, 3, 32, 32)] * 2 + [torch.randn(3, 3, 16, 16)] * 4
    out = model(crops)
    assert out.shape == (18, 64)
    # row block i belongs to crop i: the first local crop block equals a direct forward of it
    model.eval()
    out = model(crops)
    direct = model.head(backbone(crops[2]))
    assert torch.allclose(out[6:9], direct, atol=1e-5)


@pytest.mark.parametrize("arch,patch,size", [("vit_tiny", 16, 224), ("vit_small", 8, 64), ("vit_base", 16, 32)])
def test_backbones(arch, patch, size):
    model = build_backbone(arch, patch, size, drop_path_rate=0.1)
    dims = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}
    assert model(torch.randn(1, 3, size, size)).shape == (1, dims[arch])
