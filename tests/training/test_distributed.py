"""`torchrun --nproc_per_node=2` on CPU (gloo): the global batch is split, the centre stays in sync, the
head's batch norm covers the global batch, and a process whose batch is all unreadable does not leave
the other waiting forever."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.training.tiny_run import TINY_MODEL
from training.checkpoint import load_checkpoint
from training.data import find_images
from training.train import EpochSampler

REPO = Path(__file__).resolve().parents[2]

# two training processes and their start-up: ~10 s
pytestmark = pytest.mark.slow

IMAGES, GLOBAL_BATCH, WORLD = 16, 8, 2
#: a hang (processes waiting for each other) must end the test, not the test suite
RUN_TIMEOUT_S = 240


def _images(tmp_path: Path, data_dir: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for f in sorted((data_dir / "cifar10" / "train" / "dog").glob("*.jpg"))[:IMAGES]:
        shutil.copy(f, images / f.name)
    return images


def _torchrun(images: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        "-m",
        "dino.cli",
        "train",
        "--data",
        str(images),
        "--output-dir",
        str(out),
        *TINY_MODEL,
        "--out-dim",
        "128",
        "--batch-size",
        str(GLOBAL_BATCH),
        "--epochs",
        "1",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--head-bn",
        "--knn-every",
        "0",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # output to files, not pipes: a hung worker holding a pipe would block reading it
    with open(out.parent / "torchrun.out", "w+") as stdout, open(out.parent / "torchrun.err", "w+") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, text=True)
        try:
            proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # torchrun starts its workers in sessions of their own: end them one by one
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
            stderr.seek(0)
            raise AssertionError(
                f"torchrun still running after {RUN_TIMEOUT_S} s (hung):\n{stderr.read()[-3000:]}"
            ) from None
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout.read(), stderr.read())


def test_torchrun_two_processes_on_cpu(tmp_path, data_dir):
    out = tmp_path / "run"
    proc = _torchrun(_images(tmp_path, data_dir), out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 8 (2 processes)" in proc.stderr
    match = re.search(r"loss centre across 2 ranks: max difference (\S+)", proc.stderr)
    assert match and float(match.group(1)) == 0.0, proc.stderr[-2000:]
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == 2  # 16 images / global batch 8
    epochs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(r["type"] == "epoch" for r in epochs)


def test_a_rank_with_only_unreadable_images_skips_the_step_on_every_rank(tmp_path, data_dir):
    """Rank 1's first batch is all unreadable: both ranks skip that step together and the run ends
    (before the fix, rank 0 waited in the step's all-reduces for a rank that had moved on)."""
    images = _images(tmp_path, data_dir)
    files = find_images(images)
    per_rank = GLOBAL_BATCH // WORLD
    steps = IMAGES // GLOBAL_BATCH
    sampler = EpochSampler(len(files), rank=1, world_size=WORLD, seed=0, samples_per_rank=steps * per_rank)
    sampler.set_epoch(0)
    first_batch_of_rank_1 = list(sampler)[:per_rank]
    for index in first_batch_of_rank_1:
        files[index].write_bytes(b"not a JPEG")

    out = tmp_path / "run"
    proc = _torchrun(images, out)  # a hang fails after RUN_TIMEOUT_S
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step skipped: the batch of 1 of 2 process(es) had only unreadable images" in proc.stderr
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["step"] == steps - 1  # the other step trained on both ranks
    assert ckpt["skipped_images"] == per_rank  # counted over all ranks
