"""Collapse monitors (Caron et al. 2021, Sec. 5.3 and Fig. 7).

DINO avoids collapse by balancing centring (pushes the teacher towards uniform) and sharpening
(pushes it towards one prototype). The paper tracks the entropy of the teacher output and the KL
divergence between teacher and student: collapse shows as entropy -> 0 (one dimension dominates) or
entropy -> log K (uniform output), in both cases with KL -> 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: teacher entropy below/above these fractions of log K is reported as a collapse
COLLAPSE_LOW_FRACTION = 0.02
COLLAPSE_HIGH_FRACTION = 0.98


@torch.no_grad()
def collapse_metrics(
    student_global: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float,
    student_temp: float,
) -> tuple[float, float]:
    """Mean teacher entropy and mean KL(teacher || student) over the global crops (same views).

    Computed in float32 whatever the caller's autocast: the entropy of a sharp softmax over K
    prototypes is a sum of K tiny terms that bf16 would not resolve.
    """
    with torch.autocast(teacher_output.device.type, enabled=False):
        teacher_logp = F.log_softmax((teacher_output.float() - center.float()) / teacher_temp, dim=-1)
        student_logp = F.log_softmax(student_global.float() / student_temp, dim=-1)
        teacher_p = teacher_logp.exp()
        entropy = -(teacher_p * teacher_logp).sum(-1).mean()
        kl = (teacher_p * (teacher_logp - student_logp)).sum(-1).mean()
    return entropy.item(), kl.item()


@dataclass
class CollapseMonitor:
    """Accumulates the per-step metrics of an epoch and judges collapse at its end."""

    out_dim: int
    entropy_sum: float = 0.0
    kl_sum: float = 0.0
    count: int = 0

    def update(self, entropy: float, kl: float) -> None:
        self.entropy_sum += entropy
        self.kl_sum += kl
        self.count += 1

    def summary(self) -> dict:
        n = max(self.count, 1)
        entropy = self.entropy_sum / n
        return {
            "teacher_entropy": entropy,
            "teacher_entropy_max": math.log(self.out_dim),
            "kl_teacher_student": self.kl_sum / n,
        }

    def collapse_warning(self) -> str | None:
        """A message when the teacher has collapsed, else None."""
        if not self.count:
            return None
        s = self.summary()
        ratio = s["teacher_entropy"] / s["teacher_entropy_max"]
        if ratio < COLLAPSE_LOW_FRACTION:
            return f"teacher collapse to one dimension: entropy {s['teacher_entropy']:.3f} ~ 0"
        if ratio > COLLAPSE_HIGH_FRACTION:
            return (
                f"teacher collapse to a uniform output: entropy {s['teacher_entropy']:.3f} "
                f"~ log K = {s['teacher_entropy_max']:.3f}"
            )
        return None

    def reset(self) -> None:
        self.entropy_sum = self.kl_sum = 0.0
        self.count = 0
