"""The weighted k-NN classifier used to evaluate embeddings during and after training."""

from __future__ import annotations

import pytest
import torch

from training.knn import weighted_knn


def test_weighted_knn_votes():
    gallery = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.6, 0.4]]), dim=1)
    result = weighted_knn(gallery, labels, queries, torch.tensor([0, 1, 1]), num_classes=2, k=2)
    assert result["top1"] == pytest.approx(200 / 3)  # the third query is closer to class 0
    assert result["top5"] == 100.0
