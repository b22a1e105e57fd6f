"""`torchrun --nproc_per_node=2` on CPU (gloo): the global batch is split and the centre stays in sync."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]

# two training processes and their start-up: ~10 s
pytestmark = pytest.mark.slow


def test_torchrun_two_processes_on_cpu(tmp_path, data_dir):
    images = tmp_path / "images"
    images.mkdir()
    for f in sorted((data_dir / "cifar10" / "train" / "dog").glob("*.jpg"))[:16]:
        shutil.copy(f, images / f.name)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "dino.cli",
        "train",
        "--data",
        str(images),
        "--output-dir",
        str(out),
        "--arch",
        "vit_tiny",
        "--patch-size",
        "8",
        "--global-size",
        "32",
        "--local-size",
        "16",
        "--local-crops",
        "2",
        "--out-dim",
        "128",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--head-bn",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 8 (2 processes)" in proc.stderr
    match = re.search(r"loss centre across 2 ranks: max difference (\S+)", proc.stderr)
    assert match and float(match.group(1)) == 0.0, proc.stderr[-2000:]
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == 2  # 16 images / global batch 8
    epochs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(r["type"] == "epoch" for r in epochs)
