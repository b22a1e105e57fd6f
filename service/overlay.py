"""The attention heatmap overlay PNG served by ``GET /attention``, with Pillow and NumPy only.

The map (see :mod:`dino.attention`) is min-max normalised, upsampled (bicubic) to the centre crop
the model saw, coloured with a viridis-like colormap and blended over the crop. With a threshold,
the patches outside the kept attention mass are dimmed, as in DINO's ``visualize_attention.py``
(``--threshold``).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

#: matplotlib's viridis at 9 evenly spaced points; interpolated to a 256-entry lookup table
_VIRIDIS_KEYS = np.array(
    [
        (68, 1, 84),
        (71, 44, 122),
        (59, 82, 139),
        (44, 113, 142),
        (33, 145, 140),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ],
    dtype=np.float64,
)
COLORMAP = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_VIRIDIS_KEYS)), _VIRIDIS_KEYS[:, c]) for c in range(3)],
    axis=1,
).astype(np.uint8)
#: weight of the heatmap against the photo in the overlay
HEATMAP_OPACITY = 0.6
#: brightness kept by the pixels outside the thresholded attention mass
DIM_OUTSIDE_MASK = 0.25


def render_overlay(crop: Image.Image, attention_map: np.ndarray, mask: np.ndarray | None = None) -> bytes:
    """PNG of the attention heatmap over the centre crop (same size as the crop)."""
    width, height = crop.size
    lo, hi = float(attention_map.min()), float(attention_map.max())
    normalised = (attention_map - lo) / (hi - lo) if hi > lo else np.zeros_like(attention_map)
    upsampled = Image.fromarray(normalised.astype(np.float32), mode="F").resize(
        (width, height), Image.Resampling.BICUBIC
    )
    levels = np.clip(np.asarray(upsampled) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    photo = np.asarray(crop.convert("RGB"), dtype=np.float32)
    blended = (1.0 - HEATMAP_OPACITY) * photo + HEATMAP_OPACITY * COLORMAP[levels].astype(np.float32)
    if mask is not None:
        # nearest upsampling keeps the patch boundaries of the mask, as DINO's figures do
        mask_image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize(
            (width, height), Image.Resampling.NEAREST
        )
        inside = (np.asarray(mask_image) > 127)[..., None]
        blended = np.where(inside, blended, photo * DIM_OUTSIDE_MASK)
    out = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()
