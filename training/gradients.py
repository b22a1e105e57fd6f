"""Gradient clipping as the DINO reference does it: each parameter's gradient on its own.

Caron et al. 2021 train ViTs with gradient clipping at 3.0; the reference implementation
(``utils.clip_gradients`` of facebookresearch/dino) rescales every parameter's gradient whose own L2
norm exceeds the threshold, leaving the others untouched. That is not ``nn.utils.clip_grad_norm_``,
which rescales all gradients together when their *total* norm exceeds the threshold: with ~150
parameter tensors the total norm is far larger than any one of them, so the total-norm rule clips far
more often, and shrinks every gradient when it does.

:func:`clip_gradients` applies the per-parameter rule and also reports what the total-norm rule would
have done, from the same per-parameter norms, so that a run's ``log.jsonl`` can compare the two.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

#: added to a gradient's norm before dividing by it, as the reference (and clip_grad_norm_) do
CLIP_EPS = 1e-6


@dataclass(frozen=True)
class ClipStats:
    """What one clipping step found.

    Attributes:
        clipped_params: parameters whose gradient the per-parameter rule rescaled.
        total_grad_norm: L2 norm of all the gradients together, before clipping: the total-norm rule
            (``clip_grad_norm_``) rescales every gradient when this exceeds the threshold.
        max_norm: the threshold (0: clipping disabled).
    """

    clipped_params: int
    total_grad_norm: float
    max_norm: float

    @property
    def total_norm_rule_clips(self) -> bool:
        """Whether ``clip_grad_norm_(params, max_norm)`` would have changed the gradients."""
        return self.max_norm > 0 and self.max_norm / (self.total_grad_norm + CLIP_EPS) < 1


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> ClipStats:
    """Rescale each gradient whose own L2 norm exceeds ``max_norm`` to that norm (in place).

    The DINO reference's per-parameter rule: ``g <- g * max_norm / (||g|| + eps)`` when that factor is
    below 1, independently for every parameter. Parameters without a gradient (``grad is None``, e.g.
    the head's last layer while it is frozen) are ignored, so they cannot influence the others.
    ``max_norm <= 0`` only measures. One host synchronisation per call, whatever the parameter count.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return ClipStats(clipped_params=0, total_grad_norm=0.0, max_norm=max_norm)
    norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
    total = torch.linalg.vector_norm(norms)
    if max_norm > 0:
        factors = (max_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        clipped = (factors < 1).sum()
        # multiplying by exactly 1.0 leaves an unclipped gradient bit-identical
        torch._foreach_mul_(grads, [f.to(g.dtype) for f, g in zip(factors.unbind(), grads, strict=True)])
    else:
        clipped = torch.zeros((), device=norms.device)
    clipped_count, total_norm = torch.stack([clipped.float(), total]).tolist()
    return ClipStats(clipped_params=int(clipped_count), total_grad_norm=float(total_norm), max_norm=max_norm)


def cancel_last_layer_gradients(head_last_layer: nn.Module) -> None:
    """Drop the gradients of the head's last layer (Caron et al. 2021, App.: it is frozen during the
    first epoch, which stabilises early training). With ``grad = None`` the optimiser skips those
    parameters entirely, weight decay included, as in the reference."""
    for p in head_last_layer.parameters():
        p.grad = None
