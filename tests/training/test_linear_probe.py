"""``dino linear``: the paper's linear probe on frozen features, on tiny folders of real CIFAR-10 photos
(airplanes and frogs, two classes a probe must tell apart), with a tiny random-init ``dino train``
checkpoint, the shipped ONNX model and the two baselines; resuming and bad input."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from dino.cli import COMMANDS
from dino.cli import main as dino
from training import linear_probe
from training.backbone import build_backbone
from training.checkpoint import rng_state, save_checkpoint
from training.config import TrainConfig
from training.head import DINOHead
from training.multicrop import MultiCropWrapper

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = REPO / "models" / "dino-vit-tiny8-imagenette-cpu"
CLASSES = ("airplane", "frog")
PER_CLASS = 16
#: a short probe: enough to learn two classes, a few seconds on a CPU
FAST = ["--epochs", "15", "--num-workers", "0", "--lr", "0.05"]


def run(argv: list[str]) -> int:
    """``dino linear ARGV`` without the CLI registry (argparse errors become their exit code)."""
    parser = argparse.ArgumentParser(prog="dino linear")
    linear_probe.add_arguments(parser)
    try:
        return linear_probe.main(parser.parse_args(argv))
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """A labelled train/val pair: 16 + 16 real photos of each class."""
    root = tmp_path_factory.mktemp("linear_data")
    for split, source in (("train", "train"), ("val", "test")):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for f in sorted((data_dir / "cifar10" / source / cls).glob("*.jpg"))[:PER_CLASS]:
                shutil.copy(f, root / split / cls / f.name)
    return root / "train", root / "val"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random-init ViT-Tiny/8 at 32 px in the layout ``dino train`` writes."""
    torch.manual_seed(0)
    wrappers = [
        MultiCropWrapper(build_backbone("vit_tiny", 8, 32), DINOHead(192, out_dim=32, hidden_dim=32, bottleneck_dim=16))
        for _ in range(2)
    ]
    config = TrainConfig(arch="vit_tiny", patch_size=8, global_size=32, local_size=16, out_dim=32)
    state = {
        "student": wrappers[0].state_dict(),
        "teacher": wrappers[1].state_dict(),
        "optimizer": torch.optim.AdamW(wrappers[0].parameters()).state_dict(),
        "dino_loss": {"center": torch.zeros(1, 32)},
        "epoch": 2,
        "step": 10,
        "config": config.to_dict(),
        "rng": rng_state(),
    }
    path = tmp_path_factory.mktemp("run") / "checkpoint.pth"
    save_checkpoint(state, path)
    return path


@pytest.fixture(scope="module")
def straight_run(checkpoint, folders, tmp_path_factory) -> dict:
    """One uninterrupted ``dino linear --checkpoint`` run: its JSON, with where it was written."""
    out = tmp_path_factory.mktemp("straight") / "result.json"
    train, val = folders
    assert (
        run(["--checkpoint", str(checkpoint), "--train", str(train), "--val", str(val), "--output", str(out), *FAST])
        == 0
    )
    return {**json.loads(out.read_text()), "_output": out}


def test_features_follow_the_reference_layout():
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", 8, 32).eval()
    images = torch.randn(3, 3, 32, 32)
    four = linear_probe.TorchFeatures(backbone, 4, False, torch.device("cpu"))(images)
    last_pooled = linear_probe.TorchFeatures(backbone, 1, True, torch.device("cpu"))(images)
    with torch.no_grad():
        cls, tokens = backbone(images), backbone.forward_features(images)  # after the final norm
    assert four.shape == (3, 4 * 192) and last_pooled.shape == (3, 2 * 192)
    torch.testing.assert_close(four[:, -192:], cls)  # the last of the 4 is the usual [CLS] embedding
    torch.testing.assert_close(last_pooled[:, :192], cls)
    torch.testing.assert_close(last_pooled[:, 192:], tokens[:, 1:].mean(dim=1))
    # the paper's choice per size; an ONNX folder has only the last block
    options = argparse.Namespace(n_last_blocks=0, avgpool=None)
    assert linear_probe._feature_options(options, "vit_small", onnx=False) == (4, False)
    assert linear_probe._feature_options(options, "vit_base", onnx=False) == (1, True)
    assert linear_probe._feature_options(options, "vit_small", onnx=True) == (1, True)


def test_the_probe_learns_and_writes_its_result(straight_run):
    assert straight_run["top1"] >= 75.0, straight_run  # two classes: chance is 50%
    assert straight_run["top5"] == 100.0
    assert (straight_run["n_train"], straight_run["n_val"], straight_run["num_classes"]) == (32, 32, 2)
    assert straight_run["model"] == "teacher" and straight_run["n_last_blocks"] == 4
    assert straight_run["avgpool"] is False and straight_run["feature_dim"] == 4 * 192
    assert "last 4 blocks" in straight_run["features"]
    assert (straight_run["epochs"], straight_run["lr"], straight_run["aug_views"]) == (15, 0.05, 2)
    assert straight_run["skipped_train"] == straight_run["skipped_val"] == 0
    assert straight_run["features_from_cache"] == {"train": False, "val": False}
    assert straight_run["seconds"] >= straight_run["probe_seconds"] >= 0
    assert [h["epoch"] for h in straight_run["history"]] == list(range(1, 16))
    out = straight_run["_output"]
    for suffix in (".train.npz", ".val.npz", ".probe.pt"):
        assert out.with_suffix(suffix).is_file(), suffix


def test_an_interrupted_run_resumes_from_its_cache_and_state(checkpoint, folders, straight_run, tmp_path, monkeypatch):
    out = tmp_path / "result.json"
    argv = ["--checkpoint", str(checkpoint), "--train", str(folders[0]), "--val", str(folders[1]), "--output", str(out)]
    real_epoch, epochs_run = linear_probe.train_epoch, []

    def interrupted_epoch(*a, **k):
        if len(epochs_run) == 6:
            raise KeyboardInterrupt
        epochs_run.append(1)
        return real_epoch(*a, **k)

    monkeypatch.setattr(linear_probe, "train_epoch", interrupted_epoch)
    with pytest.raises(KeyboardInterrupt):
        run([*argv, *FAST])
    assert not out.exists() and out.with_suffix(".train.npz").is_file()
    assert torch.load(out.with_suffix(".probe.pt"), weights_only=True)["epoch"] == 6

    # the rerun opens no image (the features come from the caches) and trains epochs 7-15 only
    monkeypatch.setattr(linear_probe.ViewsDataset, "__getitem__", lambda *a: pytest.fail("features recomputed"))
    counted: list[int] = []
    monkeypatch.setattr(linear_probe, "train_epoch", lambda *a, **k: counted.append(1) or real_epoch(*a, **k))
    assert run([*argv, *FAST]) == 0
    result = json.loads(out.read_text())
    assert len(counted) == 9 and result["features_from_cache"] == {"train": True, "val": True}
    assert result["history"] == straight_run["history"]  # the same draws as without the interruption
    assert result["top1"] == straight_run["top1"]

    # other probe settings start the probe afresh on the same cached features
    counted.clear()
    assert run([*argv, *FAST[:-1], "0.02"]) == 0
    assert len(counted) == 15


def test_the_exported_model_uses_its_last_block(folders, tmp_path, capsys):
    out = tmp_path / "onnx.json"
    split = ["--train", str(folders[0]), "--val", str(folders[1])]
    assert run(["--model", str(SHIPPED_MODEL), *split, "--output", str(out), *FAST]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "exported ONNX model" and result["feature_dim"] == 2 * 192
    assert result["n_last_blocks"] == 1 and result["avgpool"] is True and result["image_size"] == 64
    assert "only the last block" in result["features"]
    assert result["top1"] >= 75.0, result
    assert "top-1" in capsys.readouterr().out
    # more blocks than the graph exposes: a one-line refusal
    assert run(["--model", str(SHIPPED_MODEL), *split, "--n-last-blocks", "4", "--output", str(out)]) == 1
    assert "exposes only its last block" in capsys.readouterr().err


def test_baselines(checkpoint, folders, tmp_path):
    split = ["--train", str(folders[0]), "--val", str(folders[1]), *FAST, "--aug-views", "1"]
    assert run(["--baseline", "pixels", "--image-size", "32", *split, "--output", str(tmp_path / "px.json")]) == 0
    pixels = json.loads((tmp_path / "px.json").read_text())
    assert pixels["model"] == "raw pixels" and pixels["feature_dim"] == 3 * 32 * 32 and 0 <= pixels["top1"] <= 100
    rand = tmp_path / "random.json"
    assert (
        run(["--checkpoint", str(checkpoint), "--baseline", "random", "--seed", "1", *split, "--output", str(rand)])
        == 0
    )
    result = json.loads(rand.read_text())
    assert result["model"] == "random init" and result["arch"] == "vit_tiny" and result["feature_dim"] == 4 * 192
    assert result["aug_views"] == 1


def test_unreadable_images_are_skipped_and_counted(folders, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(folders[0], train)
    good = next(train.rglob("*.jpg")).read_bytes()
    (train / "frog" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (train / "frog" / "not_an_image.png").write_text("<html>definitely not a PNG</html>")
    (train / "airplane" / "empty.webp").write_bytes(b"")
    out = tmp_path / "px.json"
    argv = ["--baseline", "pixels", "--image-size", "32", "--train", str(train), "--val", str(folders[1])]
    assert run([*argv, "--output", str(out), *FAST, "--epochs", "2", "--aug-views", "0"]) == 0
    result = json.loads(out.read_text())
    assert (result["skipped_train"], result["skipped_val"], result["n_train"]) == (3, 0, 32)


def _one_line_error(capsys, expected: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("dino linear:")] == [
        line for line in err.splitlines() if "dino linear" in line
    ]
    assert expected in err, err


def test_bad_input_is_one_line_and_exit_code_1(checkpoint, folders, tmp_path, capsys):
    train, val = folders
    out = ["--output", str(tmp_path / "r.json")]
    (tmp_path / "empty" / "airplane").mkdir(parents=True)
    (tmp_path / "empty" / "airplane" / "notes.txt").write_text("no images")
    (tmp_path / "flat").mkdir()
    shutil.copy(next(train.rglob("*.jpg")), tmp_path / "flat" / "a.jpg")
    other = tmp_path / "other"
    shutil.copytree(val, other)
    (other / "frog").rename(other / "ship")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "model").mkdir()

    cases = [
        (["--checkpoint", str(checkpoint), "--train", str(tmp_path / "empty"), "--val", str(val)], "no images"),
        (
            ["--checkpoint", str(checkpoint), "--train", str(tmp_path / "flat"), "--val", str(val)],
            "root/<class>/<image>",
        ),
        (["--checkpoint", str(checkpoint), "--train", str(tmp_path / "nope"), "--val", str(val)], "does not exist"),
        (["--checkpoint", str(checkpoint), "--train", str(train), "--val", str(other)], "class folders"),
        (["--checkpoint", str(tmp_path / "missing.pth"), "--train", str(train), "--val", str(val)], "not found"),
        (["--checkpoint", str(tmp_path / "broken.pth"), "--train", str(train), "--val", str(val)], "cannot load"),
        (["--model", str(tmp_path / "model"), "--train", str(train), "--val", str(val)], "not found"),
    ]
    for argv, expected in cases:
        assert run([*argv, *out, "--num-workers", "0"]) == 1, argv
        _one_line_error(capsys, expected)
    # usage errors: exit code 2, as argparse
    assert run(["--train", str(train), "--val", str(val)]) == 2
    assert "give --checkpoint or --model" in capsys.readouterr().err
    assert run(["--checkpoint", str(checkpoint), "--model", str(SHIPPED_MODEL), "--train", "a", "--val", "b"]) == 2
    assert run(["--baseline", "pixels", "--train", str(train), "--val", str(val), "--epochs", "0"]) == 2


@pytest.mark.skipif("linear" not in COMMANDS, reason="dino linear is not registered in dino.cli yet")
def test_registered_as_dino_linear(capsys):
    assert COMMANDS["linear"][0] == "training.linear_probe"
    with pytest.raises(SystemExit) as exc:
        dino(["linear", "--help"])
    assert exc.value.code == 0 and "--aug-views" in capsys.readouterr().out
