"""DINO [CLS] attention maps as arrays: one head or the mean, and DINO's mass threshold.

The model's ``attention`` output is, per head, the last block's softmax attention of the [CLS]
query over the N patch tokens (a [heads, N] array per image). Reshaped to the patch grid it is the
map shown in the DINO paper (Caron et al. 2021, Fig. 1 and 3). NumPy only: the service renders
these maps over photos and training scores and plots them.
"""

from __future__ import annotations

import numpy as np


def select_head(attention: np.ndarray, grid: tuple[int, int], head: int | None) -> np.ndarray:
    """[heads, N] attention -> [rows, cols] map of one head, or the mean over heads (``head=None``)."""
    rows, cols = grid
    if attention.ndim != 2 or attention.shape[1] != rows * cols:
        raise ValueError(f"attention of shape {attention.shape} does not fit a {rows}x{cols} patch grid")
    chosen = attention.mean(axis=0) if head is None else attention[head]
    return chosen.reshape(rows, cols).astype(np.float32)


def mass_threshold_mask(attention_map: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the patches that hold the top ``fraction`` of the attention mass (DINO's
    visualisation: sort ascending, normalise to sum 1, keep where the cumulative sum > 1 - fraction)."""
    flat = attention_map.ravel().astype(np.float64)
    total = flat.sum()
    if total <= 0:
        return np.ones(attention_map.shape, dtype=bool)
    order = np.argsort(flat, kind="stable")
    cumulative = np.cumsum(flat[order] / total)
    keep = np.empty(flat.shape, dtype=bool)
    keep[order] = cumulative > (1.0 - fraction)
    return keep.reshape(attention_map.shape)
