"""Batch norm over the global batch on CPU processes (gloo): torch's SyncBatchNorm refuses CPU
tensors, so ``AllReduceBatchNorm1d`` must give what one ``BatchNorm1d`` gives on the whole batch:
outputs, gradients and running statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from training.batchnorm import AllReduceBatchNorm1d, convert_to_all_reduce_batchnorm
from training.head import DINOHead

CHANNELS, BATCH, WORLD = 6, 8, 2
SEED = 0


def _inputs() -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A batch with a large mean (where E[x^2] - E[x]^2 would lose digits), per-row loss weights and
    the batch norm's affine parameters."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(BATCH, CHANNELS, generator=g) * 3 + 100
    w = torch.randn(BATCH, CHANNELS, generator=g)
    params = {"weight": torch.rand(CHANNELS, generator=g) + 0.5, "bias": torch.randn(CHANNELS, generator=g)}
    return x, w, params


def _run(bn: nn.BatchNorm1d, x: torch.Tensor, w: torch.Tensor, steps: int = 2) -> dict:
    """Forward/backward ``steps`` times; the output, input and parameter gradients of the last step."""
    x = x.clone().requires_grad_(True)
    for _ in range(steps):
        bn.zero_grad()
        x.grad = None
        out = bn(x)
        (out * w).sum().backward()
    return {
        "out": out.detach(),
        "x_grad": x.grad.clone(),
        "weight_grad": bn.weight.grad.clone(),
        "bias_grad": bn.bias.grad.clone(),
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
    }


def _bn(cls: type, params: dict) -> nn.BatchNorm1d:
    bn = cls(CHANNELS)
    with torch.no_grad():
        bn.weight.copy_(params["weight"])
        bn.bias.copy_(params["bias"])
    return bn


@pytest.fixture()
def world_of_one(tmp_path):
    """A gloo process group of this one process (what torchrun would set up, with one rank)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_torch_sync_batchnorm_refuses_cpu_tensors(world_of_one):
    """Why the all-reduce batch norm exists: torch 2.x's SyncBatchNorm needs a GPU."""
    with pytest.raises(ValueError, match="expected input tensor to be on GPU"):
        nn.SyncBatchNorm(CHANNELS).train()(torch.randn(BATCH, CHANNELS))


def test_matches_batchnorm_in_a_world_of_one(world_of_one):
    x, w, params = _inputs()
    got = _run(_bn(AllReduceBatchNorm1d, params), x, w)
    expected = _run(_bn(nn.BatchNorm1d, params), x, w)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_without_a_process_group_it_is_a_batchnorm():
    x, w, params = _inputs()
    got = _run(_bn(AllReduceBatchNorm1d, params), x, w)
    expected = _run(_bn(nn.BatchNorm1d, params), x, w)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=key)


def test_conversion_keeps_parameters_buffers_and_state_dict_keys():
    head = DINOHead(8, out_dim=16, hidden_dim=12, bottleneck_dim=4, use_bn=True)
    for p in head.parameters():
        p.requires_grad = False  # as in the teacher
    before = dict(head.named_parameters())
    keys = list(head.state_dict())
    convert_to_all_reduce_batchnorm(head)
    bns = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == 2 and all(type(m) is AllReduceBatchNorm1d for m in bns)
    assert list(head.state_dict()) == keys
    for name, p in head.named_parameters():
        assert p is before[name] and not p.requires_grad


def _worker(rank: int, store: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        x, w, params = _inputs()
        share = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        result = _run(_bn(AllReduceBatchNorm1d, params), x[share], w[share])
        # parameter gradients of the global loss: DDP would sum (then average) them over the ranks
        for key in ("weight_grad", "bias_grad"):
            dist.all_reduce(result[key])
        torch.save(result, Path(results) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes that import torch: a few seconds
def test_two_processes_normalise_over_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    x, w, params = _inputs()
    expected = _run(_bn(nn.BatchNorm1d, params), x, w)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for key in ("out", "x_grad"):
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), expected[key], rtol=1e-5, atol=1e-5, msg=key)
    for r in ranks:
        for key in ("weight_grad", "bias_grad", "running_mean", "running_var"):
            torch.testing.assert_close(r[key], expected[key], rtol=1e-5, atol=1e-5, msg=key)
