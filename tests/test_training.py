"""Training core: loss, centre, EMA, schedules, augmentation, head, and real short runs."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino.cli import main as dino
from training.augmentation import MultiCropAugmentation, blur_sigma
from training.backbone import build_backbone
from training.checkpoint import load_checkpoint
from training.config import TrainConfig, add_config_arguments, config_from_args
from training.data import UnlabelledImageFolder, collate_skip_none
from training.head import DINOHead
from training.knn import weighted_knn
from training.loss import DINOLoss
from training.multicrop import MultiCropWrapper
from training.schedules import cosine_schedule, teacher_temp_schedule
from training.train import update_teacher

REPO = Path(__file__).resolve().parents[1]

# a tiny, fast configuration used by every real run below
TINY_RUN = [
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


# ---------------------------------------------------------------- loss


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_dino_loss_matches_hand_computation():
    # B=1, K=3, 3 crops (2 global + 1 local); centre starts at zero.
    student = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-0.3, 0.2, 0.1]]
    teacher = [[0.2, 0.1, 0.0], [0.0, 0.3, 0.6]]
    t_temp, s_temp = 0.5, 0.1
    p = [_softmax([x / t_temp for x in row]) for row in teacher]
    logq = [[math.log(v) for v in _softmax([x / s_temp for x in row])] for row in student]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # (teacher view, student view), same view skipped
    expected = sum(-sum(pk * lq for pk, lq in zip(p[t], logq[s])) for t, s in pairs) / len(pairs)

    loss_fn = DINOLoss(out_dim=3, ncrops=3, student_temp=s_temp, center_momentum=0.9)
    loss = loss_fn(torch.tensor(student), torch.tensor(teacher), t_temp)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_uses_the_centre_and_batch_mean():
    torch.manual_seed(0)
    out_dim, ncrops, batch = 8, 4, 5
    loss_fn = DINOLoss(out_dim, ncrops)
    loss_fn.center.copy_(torch.randn(1, out_dim))
    center = loss_fn.center.clone()
    s, t = torch.randn(ncrops * batch, out_dim), torch.randn(2 * batch, out_dim)
    # independent per-sample computation
    p = torch.softmax((t - center) / 0.04, -1).view(2, batch, -1)
    logq = torch.log_softmax(s / 0.1, -1).view(ncrops, batch, -1)
    terms = [-(p[i] * logq[j]).sum(-1).mean() for i in range(2) for j in range(ncrops) if i != j]
    assert loss_fn(s, t, 0.04).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_centre_update_is_an_ema_of_the_teacher_batch_mean():
    loss_fn = DINOLoss(out_dim=4, ncrops=2, center_momentum=0.9)
    t1 = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]])
    loss_fn(torch.zeros(2, 4), t1, 0.04)
    assert torch.allclose(loss_fn.center, torch.tensor([[0.2, 0.2, 0.2, 0.2]]))
    t2 = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 10.0]])
    loss_fn(torch.zeros(2, 4), t2, 0.04)
    # 0.9 * 0.2 + 0.1 * [5, 0, 0, 5]
    assert torch.allclose(loss_fn.center, torch.tensor([[0.68, 0.18, 0.18, 0.68]]))


def test_loss_rejects_wrong_crop_layout():
    with pytest.raises(ValueError, match="crops"):
        DINOLoss(16, ncrops=4)(torch.zeros(10, 16), torch.zeros(4, 16), 0.04)


# ---------------------------------------------------------------- EMA, schedules, head, model


def test_teacher_ema_update():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t_before = [p.detach().clone() for p in teacher.parameters()]
    update_teacher(student, teacher, 0.9)
    for t_new, t_old, s in zip(teacher.parameters(), t_before, student.parameters()):
        assert torch.allclose(t_new, 0.9 * t_old + 0.1 * s.detach())
    update_teacher(student, teacher, 1.0)  # momentum 1: teacher frozen
    update_teacher(student, teacher, 0.0)  # momentum 0: teacher = student
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s.detach())


def test_cosine_schedule_with_warmup():
    sched = cosine_schedule(1.0, 0.1, epochs=4, steps_per_epoch=10, warmup_epochs=1)
    assert len(sched) == 40
    assert sched[0] == 0.0 and sched[9] == pytest.approx(0.9)  # linear warm-up, 10 steps
    assert sched[10] == pytest.approx(1.0)  # peak right after warm-up
    # the reference formula: the last step is one cosine step short of the final value
    assert sched[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 29 / 30)))
    assert np.all(np.diff(sched[10:]) <= 1e-12)  # monotone decay
    # half-way through the cosine part: the mean of base and final
    assert sched[10 + 15] == pytest.approx(0.55)
    momentum = cosine_schedule(0.996, 1.0, epochs=2, steps_per_epoch=5)
    assert momentum[0] == pytest.approx(0.996) and momentum[-1] == pytest.approx(1.0, abs=1e-4)


def test_teacher_temperature_warmup():
    temps = teacher_temp_schedule(0.04, 0.07, warmup_epochs=4, epochs=6)
    assert temps.tolist() == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07, 0.07])


def test_head_shapes_and_frozen_norm():
    head = DINOHead(192, out_dim=1000, use_bn=True, norm_last_layer=True)
    out = head(torch.randn(6, 192))
    assert out.shape == (6, 1000)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    # the bottleneck is L2-normalised, so with unit-norm rows |logit| <= 1
    assert out.abs().max() <= 1.0 + 1e-5
    assert DINOHead(192, 1000, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_multicrop_wrapper_runs_local_crops_through_the_same_backbone():
    backbone = build_backbone("vit_tiny", 4, 32)
    model = MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, 64, hidden_dim=32, bottleneck_dim=16))
    crops = [torch.randn(3, 3, 32, 32)] * 2 + [torch.randn(3, 3, 16, 16)] * 4
    out = model(crops)
    assert out.shape == (18, 64)
    # row block i belongs to crop i: the first local crop block equals a direct forward of it
    model.eval()
    out = model(crops)
    direct = model.head(backbone(crops[2]))
    assert torch.allclose(out[6:9], direct, atol=1e-5)


@pytest.mark.parametrize("arch,patch,size", [("vit_tiny", 16, 224), ("vit_small", 8, 64), ("vit_base", 16, 32)])
def test_backbones(arch, patch, size):
    model = build_backbone(arch, patch, size, drop_path_rate=0.1)
    dims = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}
    assert model(torch.randn(1, 3, size, size)).shape == (1, dims[arch])


def test_augmentation_shapes(sample_photos):
    aug = MultiCropAugmentation(global_size=64, local_size=32, local_crops=5)
    image = Image.open(sample_photos[0]).convert("RGB")
    crops = aug(image)
    assert len(crops) == aug.ncrops == 7
    assert all(c.shape == (3, 64, 64) for c in crops[:2])
    assert all(c.shape == (3, 32, 32) for c in crops[2:])
    assert all(c.dtype == torch.float32 for c in crops)
    # normalised with ImageNet statistics: roughly zero-centred, not in [0, 1]
    assert crops[0].min() < 0 < crops[0].max()
    assert not torch.equal(crops[0], crops[1])


def test_blur_is_scaled_to_the_crop_side():
    """The paper's sigma 0.1-2.0 px is for 224 px crops; a 64 px crop gets the same relative blur."""
    from torchvision.transforms import v2

    def walk(transform):  # Compose and RandomApply keep their children in a plain list
        yield transform
        for child in getattr(transform, "transforms", []):
            yield from walk(child)

    assert blur_sigma(224) == pytest.approx((0.1, 2.0))
    aug = MultiCropAugmentation(global_size=64, local_size=32, local_crops=1)
    for pipeline, size in ((aug.global1, 64), (aug.global2, 64), (aug.local, 32)):
        blurs = [t for t in walk(pipeline) if isinstance(t, v2.GaussianBlur)]
        assert len(blurs) == 1
        assert blurs[0].sigma == pytest.approx(list(blur_sigma(size)))
        assert blurs[0].sigma[1] == pytest.approx(2.0 * size / 224)


def test_config_yaml_then_flags(tmp_path):
    import argparse

    (tmp_path / "c.yaml").write_text("arch: vit_tiny\nlr: 0.01\nlocal_crops: 4\nhead_bn: true\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.5"]))
    assert (cfg.arch, cfg.lr, cfg.local_crops, cfg.head_bn, cfg.epochs) == ("vit_tiny", 0.5, 4, True, 100)
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"not_a_key": 1})


def test_weighted_knn_votes():
    gallery = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.6, 0.4]]), dim=1)
    result = weighted_knn(gallery, labels, queries, torch.tensor([0, 1, 1]), num_classes=2, k=2)
    assert result["top1"] == pytest.approx(200 / 3)  # the third query is closer to class 0
    assert result["top5"] == 100.0


# ---------------------------------------------------------------- real runs


@pytest.fixture()
def image_folder(tmp_path, data_dir) -> Path:
    """24 real CIFAR-10 photos in a nested folder (labels ignored by training)."""
    root = tmp_path / "images"
    for cls in ("airplane", "cat", "ship"):
        (root / cls).mkdir(parents=True)
        for f in sorted((data_dir / "cifar10" / "train" / cls).glob("*.jpg"))[:8]:
            shutil.copy(f, root / cls / f.name)
    return root


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
    assert set(ckpt) >= {"student", "teacher", "optimizer", "dino_loss", "scaler", "config", "rng"}
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
