"""Atomic checkpoints: a crash or ``kill -9`` at any moment leaves the previous checkpoint intact."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from training.weights import load_torch_file

CHECKPOINT_NAME = "checkpoint.pth"


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    ``os.replace`` is atomic on POSIX, so readers see either the old or the new file, never a torn one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` onto the CPU, without running pickled code
    (:func:`training.weights.load_torch_file`)."""
    return load_torch_file(path)


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) random states, for the checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
