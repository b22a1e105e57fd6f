"""The DINO loss: cross-entropy between the teacher's centred, sharpened views and the student's
other views, and the EMA of the centre."""

from __future__ import annotations

import math

import pytest
import torch

from training.loss import DINOLoss
from training.monitors import collapse_metrics


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_dino_loss_matches_hand_computation():
    # B=1, K=3, 3 crops (2 global + 1 local); centre starts at zero.
    student = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-0.3, 0.2, 0.1]]
    teacher = [[0.2, 0.1, 0.0], [0.0, 0.3, 0.6]]
    t_temp, s_temp = 0.5, 0.1
    p = [_softmax([x / t_temp for x in row]) for row in teacher]
    logq = [[math.log(v) for v in _softmax([x / s_temp for x in row])] for row in student]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # (teacher view, student view), same view skipped
    expected = sum(-sum(pk * lq for pk, lq in zip(p[t], logq[s], strict=True)) for t, s in pairs) / len(pairs)

    loss_fn = DINOLoss(out_dim=3, ncrops=3, student_temp=s_temp, center_momentum=0.9)
    loss = loss_fn(torch.tensor(student), torch.tensor(teacher), t_temp)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_uses_the_centre_and_batch_mean():
    torch.manual_seed(0)
    out_dim, ncrops, batch = 8, 4, 5
    loss_fn = DINOLoss(out_dim, ncrops)
    loss_fn.center.copy_(torch.randn(1, out_dim))
    center = loss_fn.center.clone()
    s, t = torch.randn(ncrops * batch, out_dim), torch.randn(2 * batch, out_dim)
    # independent per-sample computation
    p = torch.softmax((t - center) / 0.04, -1).view(2, batch, -1)
    logq = torch.log_softmax(s / 0.1, -1).view(ncrops, batch, -1)
    terms = [-(p[i] * logq[j]).sum(-1).mean() for i in range(2) for j in range(ncrops) if i != j]
    assert loss_fn(s, t, 0.04).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_centre_update_is_an_ema_of_the_teacher_batch_mean():
    loss_fn = DINOLoss(out_dim=4, ncrops=2, center_momentum=0.9)
    t1 = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]])
    loss_fn(torch.zeros(2, 4), t1, 0.04)
    assert torch.allclose(loss_fn.center, torch.tensor([[0.2, 0.2, 0.2, 0.2]]))
    t2 = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 10.0]])
    loss_fn(torch.zeros(2, 4), t2, 0.04)
    # 0.9 * 0.2 + 0.1 * [5, 0, 0, 5]
    assert torch.allclose(loss_fn.center, torch.tensor([[0.68, 0.18, 0.18, 0.68]]))


def test_loss_rejects_wrong_crop_layout():
    with pytest.raises(ValueError, match="crops"):
        DINOLoss(16, ncrops=4)(torch.zeros(10, 16), torch.zeros(4, 16), 0.04)


def test_bf16_autocast_keeps_loss_softmax_and_centre_in_float32():
    """Under bf16 autocast (the CUDA default, and ``--precision bf16`` on the CPU) the network's outputs
    are bf16, but the loss, its softmaxes and the centre update run in float32: autocast alone would run
    the loss's einsum (a bmm) in bf16."""
    torch.manual_seed(0)
    out_dim, ncrops, batch = 4096, 4, 8
    student = torch.randn(ncrops * batch, out_dim).bfloat16()
    teacher = torch.randn(2 * batch, out_dim).bfloat16()
    bf16_loss, fp32_loss = DINOLoss(out_dim, ncrops), DINOLoss(out_dim, ncrops)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = bf16_loss(student, teacher, 0.04)
    expected = fp32_loss(student.float(), teacher.float(), 0.04)  # no autocast: float32 throughout
    assert loss.dtype == torch.float32
    assert bf16_loss.center.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(bf16_loss.center, fp32_loss.center)


def test_collapse_metrics_are_float32_under_autocast():
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 512).bfloat16(), torch.randn(8, 512).bfloat16()
    center = torch.zeros(1, 512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = collapse_metrics(student, teacher, center, 0.04, 0.1)
    outside = collapse_metrics(student.float(), teacher.float(), center, 0.04, 0.1)
    assert inside == pytest.approx(outside, rel=1e-6)
