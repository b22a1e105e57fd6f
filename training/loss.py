"""The DINO loss (Caron et al. 2021, Eq. 1-2 and Sec. 3.1 "Avoiding collapse")."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student over all crop pairs.

    The teacher sees the 2 global crops, the student every crop; pairs where both see the same view
    are skipped. Centring (subtracting an EMA of the teacher's mean output) and sharpening (a low
    teacher temperature) together avoid collapse: centring alone pushes to uniform, sharpening alone
    to one dimension.

    Args:
        out_dim: K, the number of prototypes (head output size).
        ncrops: total crops per image seen by the student (2 global + N local).
        student_temp: student softmax temperature (0.1 in the paper).
        center_momentum: EMA momentum of the centre (0.9 in the paper).

    Call ``loss(student_output, teacher_output, teacher_temp)`` with the student outputs of all
    crops concatenated along dim 0 (crop after crop, B rows each) and the teacher outputs of the 2
    global crops likewise. Returns the scalar mean loss and updates ``center`` ([1, out_dim]) from the
    teacher outputs of the whole global batch (summed across processes).
    """

    n_global_crops = 2

    def __init__(self, out_dim: int, ncrops: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        if ncrops < self.n_global_crops:
            raise ValueError(f"ncrops must be >= {self.n_global_crops}, got {ncrops}")
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center: torch.Tensor
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        # float32 throughout, also under bf16 autocast: autocast would run the einsum below (a bmm) in
        # bf16, whose 8-bit mantissa blurs a softmax over K = 65536 prototypes at temperature 0.04
        # and the small differences between crops that the loss is made of
        with torch.autocast(student_output.device.type, enabled=False):
            return self._forward_fp32(student_output.float(), teacher_output.float(), teacher_temp)

    def _forward_fp32(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        batch = teacher_output.shape[0] // self.n_global_crops
        if student_output.shape[0] != batch * self.ncrops:
            raise ValueError(
                f"student output has {student_output.shape[0]} rows, expected {self.ncrops} crops x {batch}"
            )
        # [ncrops, B, K] and [2, B, K]
        student_logp = F.log_softmax(student_output / self.student_temp, dim=-1).view(self.ncrops, batch, -1)
        teacher_p = F.softmax((teacher_output - self.center) / teacher_temp, dim=-1).detach()
        teacher_p = teacher_p.view(self.n_global_crops, batch, -1)

        # ce[t, s] = mean over the batch of -sum_k p_t log q_s
        ce = -torch.einsum("tbk,sbk->ts", teacher_p, student_logp) / batch
        same_view = torch.eye(self.n_global_crops, self.ncrops, dtype=torch.bool, device=ce.device)
        loss = ce[~same_view].mean()
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the mean teacher output over the global batch (all processes), kept in float32: the
        centre accumulates small updates (1 - momentum = 0.1 of a batch mean) that bf16 would round away."""
        batch_sum = teacher_output.float().sum(dim=0, keepdim=True, dtype=torch.float32)
        count = torch.tensor([teacher_output.shape[0]], dtype=torch.float32, device=batch_sum.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        batch_center = batch_sum / count
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
