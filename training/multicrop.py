"""Runs a list of crops of different resolutions through one backbone and one head."""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn


class MultiCropWrapper(nn.Module):
    """Backbone + head applied to every crop; crops of equal resolution share one forward pass.

    The output concatenates the crops along dim 0 in the order given (crop after crop, B rows each),
    which is the layout ``DINOLoss`` expects. The head runs once on all [CLS] embeddings together.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        embeddings = []
        # consecutive crops of the same size are batched together (2 globals, then N locals)
        for _, same_size in itertools.groupby(crops, key=lambda c: tuple(c.shape[-2:])):
            group = list(same_size)
            embeddings.append(self.backbone(torch.cat(group)))
        return self.head(torch.cat(embeddings))
