"""DINO_PRECISION: which file of the model folder is served, and that /readyz and /metrics say so.

The int8 file is made by the real quantiser (``training.quantize``) from the test model; its k-NN
drop is written into model.json as ``dino export --int8`` records it, with values chosen per test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from dino.model_folder import METADATA_FILE, sha256_file
from service.app import create_app
from service.runtime import ModelLoadError, OnnxModel, default_batch_cap
from service.settings import ServiceSettings
from tests.service.images import multipart, photo_bytes

REPO = Path(__file__).resolve().parents[2]
INT8 = "model_int8.onnx"


@pytest.fixture(scope="module")
def int8_file(model_dir, tmp_path_factory) -> Path:
    """The test model quantised to int8 (dynamic, as dino export --int8 does by default)."""
    from training.quantize import quantize_file

    target = tmp_path_factory.mktemp("int8") / INT8
    quantize_file(model_dir / "model.onnx", target, "dynamic", "image", [])
    return target


def folder_with_int8(model_dir: Path, int8_file: Path, tmp_path: Path, drop: float | None) -> Path:
    """A copy of the test model folder with the int8 file and a model.json recording ``drop``."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    shutil.copy(int8_file, folder / INT8)
    meta = json.loads((folder / METADATA_FILE).read_text())
    meta["int8_file"] = INT8
    meta["int8_sha256"] = sha256_file(folder / INT8)
    meta["int8"] = {"method": "dynamic", "knn_drop_points": drop}
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize(
    ("drop", "precision", "served"),
    [
        (0.2, "auto", "int8"),  # measured and small: int8 on the CPU
        (-0.3, "auto", "int8"),  # int8 scored higher
        (0.9, "auto", "fp32"),  # measured too large
        (None, "auto", "fp32"),  # never measured: not trusted
        (0.2, "fp32", "fp32"),
        (0.9, "int8", "int8"),  # asked for explicitly: served whatever the drop
    ],
)
def test_precision_picks_the_file(model_dir, int8_file, tmp_path, drop, precision, served):
    folder = folder_with_int8(model_dir, int8_file, tmp_path, drop)
    model = OnnxModel(folder, provider="cpu", precision=precision)
    assert model.precision == served
    assert model.file == {"int8": INT8, "fp32": "model.onnx"}[served]
    assert model.sha256 == json.loads((folder / METADATA_FILE).read_text())["sha256"]  # identity: the fp32 file


def test_int8_serves_the_three_outputs_close_to_fp32(model_dir, int8_file, tmp_path):
    folder = folder_with_int8(model_dir, int8_file, tmp_path, 0.0)
    fp32 = OnnxModel(folder, provider="cpu", precision="fp32")
    int8 = OnnxModel(folder, provider="cpu", precision="int8")
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((4, 3, 64, 64)).astype(np.float32)
    a, b = fp32.run(batch), int8.run(batch)
    for name in ("embedding", "patch_tokens", "attention"):
        assert a[name].shape == b[name].shape and b[name].dtype == np.float32
    cosine = np.sum(a["embedding"] * b["embedding"], 1) / (
        np.linalg.norm(a["embedding"], axis=1) * np.linalg.norm(b["embedding"], axis=1)
    )
    assert cosine.min() > 0.99
    assert not np.array_equal(a["embedding"], b["embedding"])  # it is another computation, not the same file
    assert np.all(b["attention"].sum(-1) <= 1.0 + 1e-4)  # still a softmax over [CLS] + patches


def test_a_precision_the_folder_cannot_serve_is_a_clear_error(model_dir, int8_file, tmp_path):
    with pytest.raises(ModelLoadError, match="no int8 file"):
        OnnxModel(model_dir, provider="cpu", precision="int8")
    with pytest.raises(ModelLoadError, match="no fp16 file"):
        OnnxModel(model_dir, provider="cpu", precision="fp16")
    folder = folder_with_int8(model_dir, int8_file, tmp_path, 0.1)
    (folder / INT8).write_bytes((folder / INT8).read_bytes()[:-10])  # edited after export
    with pytest.raises(ModelLoadError, match="sha256"):
        OnnxModel(folder, provider="cpu", precision="auto")


def test_readyz_and_metrics_name_the_file_served(model_dir, int8_file, tmp_path):
    folder = folder_with_int8(model_dir, int8_file, tmp_path, 0.3)
    settings = ServiceSettings(model_dir=folder, provider="cpu", warmup_batches=1, preprocess_threads=1)
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz").json()
        assert (ready["model_file"], ready["precision"]) == (INT8, "int8")
        assert client.post("/embed", files=multipart(photo_bytes(0))).status_code == 200
        metrics = client.get("/metrics").text
        assert 'file="model_int8.onnx"' in metrics and 'precision="int8"' in metrics
        state = client.app.state.service  # type: ignore[attr-defined]
        assert state.batcher.max_batch_size == default_batch_cap("CPUExecutionProvider")


def test_dino_serve_refuses_a_precision_the_folder_lacks_in_one_line(model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "dino.cli", "serve", "--model", str(model_dir), "--port", "0"],
        env={"DINO_PRECISION": "int8", "PATH": "/usr/bin:/bin"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no int8 file" in result.stderr
    assert "Traceback" not in result.stderr
