"""The graph that ``dino export`` writes: one forward pass, three outputs (Caron et al. 2021, Sec. 4.2).

:class:`DinoExportModule` wraps a timm ``VisionTransformer`` so that one pass yields the [CLS]
embedding after the final norm (the feature DINO uses for k-NN), the normalised patch tokens, and
the last block's [CLS] self-attention over the patches, the map of the paper's Fig. 1.

The attention is ``softmax(q_cls k^T / sqrt(d))`` over all N + 1 tokens with the [CLS] column
dropped afterwards, *not* renormalised: each head's N values sum to ``1 - attn(cls -> cls)``.
:func:`reference_outputs` computes the same three outputs independently, from timm's own unfused
attention path, for parity checks.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn


class ExportError(Exception):
    """A user-facing export failure (bad checkpoint, unsupported model, verification failure)."""


def cls_attention(block: nn.Module, x: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Softmax attention weights of the [CLS] query over the patch tokens in ``block`` for input ``x``.

    timm's ``Attention`` uses fused scaled-dot-product attention, which never materialises the
    weights, so they are recomputed from the block's own ``qkv`` projection (with its q/k norms and
    scale). Only the [CLS] query row is computed: O(N) instead of O(N^2) extra work.

    Returns [B, heads, N] where N excludes the prefix ([CLS], register) tokens.
    """
    attn = block.attn
    h = block.norm1(x)
    batch, tokens, _ = h.shape
    qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # [B, heads, 1, tokens]
    return logits.softmax(dim=-1)[:, :, 0, num_prefix_tokens:]


class DinoExportModule(nn.Module):
    """Wraps a timm ``VisionTransformer`` so that one forward pass yields (embedding, patch_tokens, attention).

    The computation is timm's ``forward_features`` + token pooling, with the last block's [CLS]
    attention weights recomputed alongside (see :func:`cls_attention`).
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        _check_supported(vit)
        self.vit: Any = vit  # a timm VisionTransformer, whose parts torch's typing cannot see

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vit = self.vit
        x = vit.patch_embed(image)
        x = vit._pos_embed(x)  # resamples the position embeddings to the input's grid
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        for block in vit.blocks[:-1]:
            x = block(x)
        last = vit.blocks[-1]
        attention = cls_attention(last, x, vit.num_prefix_tokens)
        x = vit.norm(last(x))
        return x[:, 0], x[:, vit.num_prefix_tokens :], attention


@torch.no_grad()
def reference_outputs(backbone: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three outputs computed in PyTorch eager mode, independently of :class:`DinoExportModule`.

    For parity checks of exported models: the embedding is ``backbone(images)``, the patch tokens come
    from ``forward_features`` and the attention is captured from timm's own unfused attention path
    (the softmax weights entering ``attn_drop`` of the last block), not recomputed.
    """
    vit = copy.deepcopy(backbone).float().cpu().eval()
    attn = vit.blocks[-1].attn
    attn.fused_attn = False  # the unfused path materialises the softmax weights
    captured: list[torch.Tensor] = []
    hook = attn.attn_drop.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        images = images.float().cpu()
        embedding = vit(images)
        captured.clear()  # keep only the weights of the forward_features pass below
        tokens = vit.forward_features(images)
    finally:
        hook.remove()
    if len(captured) != 1:
        raise ExportError("could not capture the last block's attention weights from timm's Attention")
    prefix = vit.num_prefix_tokens
    return {"embedding": embedding, "patch_tokens": tokens[:, prefix:], "attention": captured[0][:, :, 0, prefix:]}


class Float16Module(nn.Module):
    """Runs a module in float16 behind a float32 interface (the casts become part of the ONNX graph)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.half()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.module(image.half())
        return tuple(o.float() for o in outputs)


def _check_supported(vit: nn.Module) -> None:
    """Fail early, with a clear message, on backbones the wrapper cannot export."""
    needed = ("patch_embed", "_pos_embed", "blocks", "norm", "num_prefix_tokens")
    missing = [name for name in needed if not hasattr(vit, name)]
    if missing:
        raise ExportError(f"expected a timm VisionTransformer; {type(vit).__name__} lacks {', '.join(missing)}")
    if getattr(vit, "global_pool", "token") != "token":
        raise ExportError(f"the embedding must be the [CLS] token; backbone pools with {vit.global_pool!r}")
    attn = vit.blocks[-1].attn
    if not all(hasattr(attn, name) for name in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")):
        raise ExportError(f"unsupported attention module {type(attn).__name__} in the last block")
