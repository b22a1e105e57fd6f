"""Batch norm over the global batch for several CPU processes (gloo), where ``nn.SyncBatchNorm`` refuses.

The DINO reference converts the head's batch norms (``--use_bn_in_head``) to ``nn.SyncBatchNorm`` so
that their statistics cover the whole global batch, not each GPU's share. ``nn.SyncBatchNorm`` of
torch 2.x raises ``ValueError`` for CPU tensors ("expected input tensor to be on GPU ..."), so a
``torchrun`` run on CPUs would otherwise either crash or, without conversion, normalise each rank's
batch on its own: a different model from the single-process run with the same global batch.

:class:`AllReduceBatchNorm1d` computes the mean and the (biased) variance of the global batch with two
differentiable all-reduces of per-channel sums (the second one of squared deviations from the global
mean, which stays accurate where the sum of squares would cancel), in float32, and updates the
running statistics from them exactly as ``BatchNorm1d`` does. Its state dict keys are those of
``BatchNorm1d``: checkpoints load either way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes, with the sum of the incoming gradients as the gradient: every rank's
    input influences every rank's output, so every rank's loss contributes to its gradient.

    torch's own ``torch.distributed.nn.functional.all_reduce`` does the same but is deprecated in
    torch 2.14 (a FutureWarning at every call) in favour of a private module."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad_outputs[0].clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Differentiable ``dist.all_reduce`` (sum) that returns a new tensor."""
    return _AllReduceSum.apply(tensor, group)


class AllReduceBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training-mode statistics cover the batch of every process of ``group``.

    Outside training mode, or when no process group is initialised, it is a plain ``BatchNorm1d``.
    """

    def __init__(self, *args: Any, group: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.group = group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]  # every dimension but the channels
        shape = [1, -1] + [1] * (input.dim() - 2)
        # statistics in float32 even under bf16 autocast: a bf16 sum over a batch loses the mean
        x = input.float()
        local_count = x.new_tensor([input.numel() // input.shape[1]])
        sums = all_reduce_sum(torch.cat([x.sum(dims), local_count]), self.group)
        count = sums[-1]
        mean = sums[:-1] / count
        centred = x - mean.view(shape)
        var = all_reduce_sum(centred.pow(2).sum(dims), self.group) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """As ``BatchNorm1d``: EMA (or cumulative average when momentum is None) of the batch mean and
        of the unbiased batch variance."""
        assert self.running_mean is not None and self.running_var is not None  # track_running_stats
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_to_all_reduce_batchnorm(module: nn.Module, group: Any = None) -> nn.Module:
    """Replace every ``BatchNorm1d`` below ``module`` by an :class:`AllReduceBatchNorm1d` holding the
    same parameters and running statistics (returns ``module``, or the replacement if it is one)."""
    if type(module) is nn.BatchNorm1d:
        bn = module
        replacement = AllReduceBatchNorm1d(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            group=group,
        )
        # the very same parameters and buffers (as nn.SyncBatchNorm.convert_sync_batchnorm): device,
        # values and requires_grad (False in the teacher) carry over
        if bn.affine:
            replacement.weight, replacement.bias = bn.weight, bn.bias
        if bn.track_running_stats:
            replacement.running_mean, replacement.running_var = bn.running_mean, bn.running_var
            replacement.num_batches_tracked = bn.num_batches_tracked
        replacement.train(bn.training)
        return replacement
    for name, child in module.named_children():
        setattr(module, name, convert_to_all_reduce_batchnorm(child, group))
    return module
