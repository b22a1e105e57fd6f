"""``benchmarks/gpu_check.py`` must work the first time it meets a GPU: its dry run goes through every
part on the CPU (the same commands, at toy sizes), and its packed data must unpack as the check reads it.

GPU time is scarce and a typo found there costs a lease, so the dry run is held to what the GPU run
needs: every part ok (the CUDA onnxruntime part may only be skipped), the JSON complete, the PNGs real.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.gpu_data import pack, unpack

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
PARTS = {
    "environment",
    "data",
    "train_throughput",
    "train_throughput_compiled",
    "dino_run",
    "knn",
    "export",
    "parity",
    "attention_boxes",
    "attention_grid",
    "ort_cpu_throughput",
    "ort_cuda_throughput",
    "plots",
}
PNGS = ("curves.png", "attention_grid.png", "throughput.png")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, data_dir) -> Path:
    """2 train and 1 val photo per Imagenette class, plus the 14 boxed sample photos, packed as for the GPU."""
    folder = tmp_path_factory.mktemp("gpu_check_data")
    pack(data_dir, folder, train_per_class=2, val_per_class=1)
    return folder


def test_packed_data_unpacks_into_labelled_folders(tiny_data, tmp_path):
    manifest = unpack(tiny_data, tmp_path)
    assert manifest["splits"]["imagenette/train"] == {**manifest["splits"]["imagenette/train"], "images": 20}
    train = sorted(p for p in (tmp_path / "imagenette" / "train").iterdir() if p.is_dir())
    val = sorted(p for p in (tmp_path / "imagenette" / "val").iterdir() if p.is_dir())
    assert [p.name for p in train] == [p.name for p in val] and len(train) == 10  # labelled, same classes
    assert all(len(list(p.iterdir())) == 2 for p in train)
    boxes = json.loads((REPO / "training" / "imagenet_sample_boxes.json").read_text())["boxes"]
    assert sorted(p.name for p in (tmp_path / "imagenet-sample").iterdir()) == sorted(boxes)
    with Image.open(next(train[0].iterdir())) as photo:
        assert min(photo.size) == 144  # re-encoded small
    assert manifest["bytes"] == (tiny_data / "images.zip").stat().st_size


def test_refuses_to_run_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "no CUDA GPU" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dry_run_goes_through_every_part(tiny_data, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--data", str(tiny_data), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    parts = results["parts"]
    assert set(parts) == PARTS
    statuses = {name: part["status"] for name, part in parts.items()}
    allowed = {name: {"ok"} for name in PARTS} | {"ort_cuda_throughput": {"ok", "skipped"}}
    assert all(statuses[name] in allowed[name] for name in PARTS), statuses
    assert results["dry_run"] is True and results["statuses"] == statuses

    # the numbers each part exists for
    assert parts["train_throughput"]["rows"][0]["img_s"] > 0
    assert parts["train_throughput"]["with_loader"]["img_s"] > 0
    assert parts["train_throughput_compiled"]["rows"][0]["compile"] is True
    assert parts["dino_run"]["epochs_done"] == 1 and parts["dino_run"]["knn_during_training"]
    assert {"teacher", "random_init"} <= set(parts["knn"]) and parts["knn"]["teacher"]["k"] > 0
    assert {"model.onnx", "model_fp16.onnx"} <= set(parts["export"]["report"])
    cosine = parts["parity"]["vs_ort_cpu_fp32"]["torch_cpu_fp32"]["embedding"]["cosine_min"]
    assert cosine > 0.9999
    assert {"dino-gpu-check", "random-init"} == set(parts["attention_boxes"]["mean"])
    assert parts["ort_cpu_throughput"]["rows"][0]["img_per_s"] > 0

    # what comes back from the device: few files, real images, the log; nothing heavy
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["results.json", "gpu_check.log", *PNGS])
    for name in PNGS:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) >= 100
    assert "dino_run: ok" in (out / "gpu_check.log").read_text()
    assert not Path(results["work_dir"]).exists()  # the temporary work folder is removed
