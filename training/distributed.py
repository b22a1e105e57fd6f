"""Device and process-group set-up, shared by ``dino train`` and ``dino knn``.

Under ``torchrun`` every process reads its rank from the environment (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``) and joins one process group: NCCL on CUDA, gloo on the CPU. Without ``torchrun`` the
same code runs as one process of a world of one.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class DeviceError(Exception):
    """A device was asked for that this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512_BF16 or AMX tiles), so that bf16 autocast
    is faster than float32 rather than emulated (on older CPUs oneDNN converts back and forth)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` is bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere; fp32 and bf16 are kept."""
    if name != "auto":
        return name
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


def is_main_process() -> bool:
    """Rank 0 of ``torchrun`` (or a plain single process): the one that logs and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; (0, 1, device) when not under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def shutdown_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
