"""Real ``dino train`` runs on real CIFAR-10 photos: a short run with k-NN evaluation and ``dino knn``,
resume after ``kill -9`` giving the identical teacher, unreadable files skipped and counted, and the
command's errors for a bad data folder or bad flags."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dino.cli import main as dino
from tests.training.tiny_run import TINY_MODEL
from training.augmentation import MultiCropAugmentation
from training.checkpoint import load_checkpoint
from training.data import UnlabelledImageFolder, collate_skip_none

REPO = Path(__file__).resolve().parents[2]

# a tiny, fast configuration used by every real run below
TINY_RUN = [
    *TINY_MODEL,
    "--out-dim",
    "256",
    "--batch-size",
    "8",
    "--head-bn",
    "--lr",
    "0.002",
    "--warmup-epochs",
    "0",
    "--num-workers",
    "0",
]


@pytest.fixture()
def image_folder(tmp_path, data_dir) -> Path:
    """24 real CIFAR-10 photos in a nested folder (labels ignored by training)."""
    root = tmp_path / "images"
    for cls in ("airplane", "cat", "ship"):
        (root / cls).mkdir(parents=True)
        for f in sorted((data_dir / "cifar10" / "train" / cls).glob("*.jpg"))[:8]:
            shutil.copy(f, root / cls / f.name)
    return root


@pytest.mark.slow
def test_short_training_run_on_real_images(image_folder, tmp_path, data_dir):
    out = tmp_path / "run"
    knn_root = data_dir / "cifar10" / "test"
    rc = dino(
        [
            "train",
            "--data",
            str(image_folder),
            "--output-dir",
            str(out),
            "--epochs",
            "2",
            *TINY_RUN,
            "--knn-train",
            str(data_dir / "cifar10" / "train"),
            "--knn-val",
            str(knn_root),
            "--knn-max-images",
            "40",
            "--knn-every",
            "1",
        ]
    )
    assert rc == 0
    for name in ("checkpoint.pth", "log.jsonl", "curves.png", "config.yaml", "train.log"):
        assert (out / name).is_file(), name
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6  # 24 images / batch 8 = 3 steps per epoch
    assert set(ckpt) >= {"student", "teacher", "optimizer", "dino_loss", "config", "rng"}
    assert ckpt["dino_loss"]["center"].abs().sum() > 0
    # the teacher moved (EMA of a student that trained) but is not the student
    s, t = ckpt["student"], ckpt["teacher"]
    assert not torch.equal(s["backbone.blocks.0.attn.qkv.weight"], t["backbone.blocks.0.attn.qkv.weight"])
    import json

    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    knn = [r for r in records if r["type"] == "knn"]
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["epoch"] for r in knn] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) and 0 < r["teacher_entropy"] < r["teacher_entropy_max"] for r in epochs)
    assert ckpt["knn"]["top1"] == knn[-1]["top1"]
    # clipping is measured under both rules: per step (every log record) and as shares per epoch
    steps = [r for r in records if r["type"] == "step"]
    assert steps and all(r["clipped_params"] >= 0 and r["total_grad_norm"] > 0 for r in steps)
    assert all(0 <= r["clip_share_per_param"] <= r["clip_share_total_norm"] <= 1 for r in epochs)

    # the same protocol from the command line, for the checkpoint and for the pixel baseline
    split = ["--train", str(data_dir / "cifar10" / "train"), "--val", str(knn_root), "--max-images", "40"]
    assert dino(["knn", "--checkpoint", str(out / "checkpoint.pth"), *split]) == 0
    result = json.loads((out / "knn.json").read_text())
    assert result["top1"] == pytest.approx(knn[-1]["top1"]) and result["n_val"] == 40
    assert (
        dino(["knn", "--baseline", "pixels", "--image-size", "32", *split, "--output", str(tmp_path / "px.json")]) == 0
    )
    assert 0 < json.loads((tmp_path / "px.json").read_text())["top1"] <= 100
    assert dino(["knn", "--checkpoint", str(tmp_path / "nope.pth"), *split]) == 1


def _train_cmd(data: Path, out: Path, epochs: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dino.cli",
        "train",
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--epochs",
        str(epochs),
        *TINY_RUN,
        "--num-workers",
        "1",
        "--seed",
        "3",
    ]


@pytest.mark.slow
def test_resume_after_kill_gives_identical_teacher(image_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    subprocess.run(_train_cmd(image_folder, straight, 2), check=True, env=env, capture_output=True)

    # run the same command, kill -9 it once the first epoch's checkpoint exists, then rerun it
    proc = subprocess.Popen(
        _train_cmd(image_folder, resumed, 2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (resumed / "checkpoint.pth").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(resumed / "checkpoint.pth")["epoch"] == 1
    subprocess.run(_train_cmd(image_folder, resumed, 2), check=True, env=env, capture_output=True)

    a, b = load_checkpoint(straight / "checkpoint.pth"), load_checkpoint(resumed / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 2
    for key in a["teacher"]:
        assert torch.equal(a["teacher"][key], b["teacher"][key]), key
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])


@pytest.mark.slow  # a real one-epoch run
def test_corrupt_files_are_skipped_and_counted(image_folder, tmp_path):
    good = next(image_folder.rglob("*.jpg")).read_bytes()
    (image_folder / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (image_folder / "cat" / "not_an_image.png").write_text("<html>definitely not a PNG</html>")
    (image_folder / "cat" / "empty.webp").write_bytes(b"")
    dataset = UnlabelledImageFolder(image_folder, MultiCropAugmentation(32, 16, 1))
    assert len(dataset) == 27
    crops, skipped = collate_skip_none([dataset[i] for i in range(len(dataset))])
    assert skipped == 3 and crops[0].shape == (24, 3, 32, 32)

    out = tmp_path / "run"
    # a log left by an earlier run whose checkpoint was deleted must not leak into this run's curves
    out.mkdir()
    (out / "log.jsonl").write_text('{"type": "knn", "epoch": 0, "top1": 99.0}\n')
    assert (
        dino(
            [
                "train",
                "--data",
                str(image_folder),
                "--output-dir",
                str(out),
                "--epochs",
                "1",
                *TINY_RUN,
                "--batch-size",
                "9",
                "--knn-every",
                "0",
            ]
        )
        == 0
    )
    assert load_checkpoint(out / "checkpoint.pth")["skipped_images"] == 3
    assert "3 unreadable image(s) skipped" in (out / "train.log").read_text()
    assert "99.0" not in (out / "log.jsonl").read_text()
    assert "99.0" in (out / "log.jsonl.previous").read_text()


def test_empty_or_missing_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert dino(["train", "--data", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o")]) == 1
    assert "no images found" in capsys.readouterr().err
    assert dino(["train", "--data", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert dino(["train", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert dino(["train", "--data", str(tmp_path), "--device", "tpu"]) == 2
    assert dino(["train", "--data", str(tmp_path), "--knn-every", "-1"]) == 2
    assert "knn_every must be >= 0" in capsys.readouterr().err
