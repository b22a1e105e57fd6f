"""Gradient clipping as the DINO reference does it (``utils.clip_gradients``): each parameter's
gradient on its own, with the total-norm rule measured alongside, and the frozen last layer taking no
part."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from training.gradients import cancel_last_layer_gradients, clip_gradients
from training.head import DINOHead

MAX_NORM = 3.0


def _params_with_grads(*grads: torch.Tensor) -> list[nn.Parameter]:
    params = []
    for g in grads:
        p = nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


def test_each_gradient_is_clipped_to_its_own_norm():
    # norms 1, 5 and 2: only the second exceeds 3; their total norm, sqrt(30), exceeds it too
    small, large, medium = torch.tensor([1.0, 0.0]), torch.tensor([[3.0, 4.0]]), torch.tensor([0.0, 2.0, 0.0])
    params = _params_with_grads(small, large, medium)
    stats = clip_gradients(params, MAX_NORM)

    assert stats.clipped_params == 1
    assert stats.total_grad_norm == pytest.approx(math.sqrt(1 + 25 + 4))
    assert stats.total_norm_rule_clips
    assert torch.equal(params[0].grad, small)  # untouched, bit for bit
    assert torch.equal(params[2].grad, medium)
    torch.testing.assert_close(params[1].grad, large * MAX_NORM / 5.0)
    assert params[1].grad.norm().item() == pytest.approx(MAX_NORM, rel=1e-5)

    # the total-norm rule (what training did before) would have shrunk every gradient
    reference = _params_with_grads(small, large, medium)
    nn.utils.clip_grad_norm_(reference, MAX_NORM)
    assert reference[0].grad.norm().item() < small.norm().item()


def test_nothing_clipped_below_the_threshold():
    params = _params_with_grads(torch.tensor([1.0, 1.0]), torch.tensor([2.0]))
    before = [p.grad.clone() for p in params]
    stats = clip_gradients(params, MAX_NORM)
    assert stats.clipped_params == 0 and not stats.total_norm_rule_clips  # total sqrt(6) < 3
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))


def test_many_small_gradients_clip_only_under_the_total_norm_rule():
    """The case the rules disagree on: 16 gradients of norm 1 each, total norm 4."""
    params = _params_with_grads(*[torch.tensor([1.0]) for _ in range(16)])
    stats = clip_gradients(params, MAX_NORM)
    assert stats.clipped_params == 0
    assert stats.total_grad_norm == pytest.approx(4.0) and stats.total_norm_rule_clips


def test_zero_threshold_only_measures():
    params = _params_with_grads(torch.tensor([30.0, 40.0]))
    stats = clip_gradients(params, 0.0)
    assert stats.clipped_params == 0 and not stats.total_norm_rule_clips
    assert stats.total_grad_norm == pytest.approx(50.0)
    assert torch.equal(params[0].grad, torch.tensor([30.0, 40.0]))


def test_frozen_last_layer_takes_no_part_in_clipping():
    """While the last layer is frozen its gradient is dropped first, so it can neither be counted nor
    (under a total-norm rule) shrink the others."""
    torch.manual_seed(0)
    head = DINOHead(8, out_dim=32, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    head(torch.randn(5, 8)).pow(2).sum().mul(1e4).backward()  # large gradients everywhere
    last = {id(p) for p in head.last_layer.parameters()}
    others = [p for p in head.parameters() if id(p) not in last]
    norms = [p.grad.norm().item() for p in others]
    expected = [p.grad * min(1.0, MAX_NORM / (n + 1e-6)) for p, n in zip(others, norms, strict=True)]

    cancel_last_layer_gradients(head.last_layer)
    stats = clip_gradients(head.parameters(), MAX_NORM)
    assert all(p.grad is None for p in head.last_layer.parameters())
    assert stats.clipped_params == sum(n > MAX_NORM for n in norms) > 0
    assert stats.total_grad_norm == pytest.approx(math.sqrt(sum(n * n for n in norms)), rel=1e-5)
    for p, e in zip(others, expected, strict=True):
        torch.testing.assert_close(p.grad, e)
