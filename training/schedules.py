"""Per-iteration schedules (DINO's linear warm-up then cosine; Caron et al. 2021, Sec. 4 / App.)."""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """One value per training step: linear warm-up from ``start_warmup_value`` to ``base_value``
    over ``warmup_epochs``, then a half-cosine from ``base_value`` to ``final_value``."""
    total = epochs * steps_per_epoch
    warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_steps, endpoint=False)
    t = np.arange(total - warmup_steps)
    denom = max(len(t), 1)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * t / denom))
    return np.concatenate([warmup, cosine])


def teacher_temp_schedule(warmup_temp: float, final_temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """One value per epoch: linear warm-up of the teacher temperature, then constant."""
    warmup_epochs = min(warmup_epochs, epochs)
    return np.concatenate(
        [np.linspace(warmup_temp, final_temp, warmup_epochs), np.full(epochs - warmup_epochs, final_temp)]
    )
