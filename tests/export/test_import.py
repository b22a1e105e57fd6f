"""``dino import``: every accepted file layout, built here with random weights and the exact key names,
parity of an imported official checkpoint on real photos, and clear errors for weights that do not fit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from dino import cli
from dino.model_folder import METADATA_FILE, OUTPUT_NAMES, sha256_file
from training.augmentation import eval_transform
from training.backbone import build_backbone
from training.checkpoint import rng_state, save_checkpoint
from training.config import TrainConfig
from training.export import MODEL_FILE
from training.export_graph import reference_outputs
from training.head import DINOHead
from training.multicrop import MultiCropWrapper
from training.weights import (
    FORMAT_OFFICIAL_BACKBONE,
    FORMAT_OFFICIAL_FULL,
    FORMAT_PROJECT,
    FORMAT_SAFETENSORS,
    WeightsError,
    load_backbone_weights,
)

ARCH, PATCH, SIZE = "vit_tiny", 16, 64
FP32_ATOL = 1e-4
PHOTOS = ("n01440764_tench.JPEG", "n01601694_water_ouzel.JPEG", "n03908714_pencil_sharpener.JPEG")
OFFICIAL_EPOCH = 100


class NotAllowed:
    """An arbitrary pickled object: loading it would run code, so the importer must refuse it."""


def _photos(data_dir: Path) -> torch.Tensor:
    folder = data_dir / "imagenet-sample"
    transform = eval_transform(SIZE)
    return torch.stack([transform(Image.open(folder / n).convert("RGB")) for n in PHOTOS])


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """The backbone every file below carries (random init), with timm / official DINO key names."""
    torch.manual_seed(7)
    return build_backbone(ARCH, PATCH, SIZE).state_dict()


def _dino_head_state(prefix: str) -> dict[str, torch.Tensor]:
    """Keys of the official DINOHead (weight-normalised last layer) under ``prefix``."""
    return {
        f"{prefix}mlp.0.weight": torch.randn(32, 192),
        f"{prefix}mlp.0.bias": torch.randn(32),
        f"{prefix}mlp.2.weight": torch.randn(16, 32),
        f"{prefix}mlp.2.bias": torch.randn(16),
        f"{prefix}last_layer.weight_g": torch.ones(64, 1),
        f"{prefix}last_layer.weight_v": torch.randn(64, 16),
    }


def official_full_checkpoint(weights: dict, teacher_prefix: str) -> dict:
    """Layout of the official DINO ``*_full_checkpoint.pth`` (main_dino.py's save_dict)."""
    teacher = {teacher_prefix + k: v for k, v in weights.items()} | _dino_head_state(
        teacher_prefix.replace("backbone.", "head.")
    )
    student = {"module.backbone." + k: v + 0.5 for k, v in weights.items()} | _dino_head_state("module.head.")
    return {
        "student": student,
        "teacher": teacher,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "params": [0, 1]}]},
        "epoch": OFFICIAL_EPOCH,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=64, epochs=OFFICIAL_EPOCH, lr=0.0005),
        "dino_loss": {"center": torch.zeros(1, 64)},
        "fp16_scaler": None,
    }


@pytest.fixture(scope="module")
def timm_weights(weights) -> dict[str, torch.Tensor]:
    """A timm ViT classifier state dict (same backbone, plus a ``head.`` classifier)."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=SIZE)
    model.load_state_dict(weights, strict=False)
    state = model.state_dict()
    assert {"head.weight", "head.bias"} <= set(state)
    return state


def project_checkpoint(weights: dict, arch: str = ARCH) -> dict:
    """Layout of a ``dino train`` checkpoint: MultiCropWrapper state dicts, config, k-NN, RNG states."""
    with torch.device("meta"):  # no random init: the weights are assigned right away
        backbone = build_backbone(ARCH, PATCH, SIZE)
    backbone.load_state_dict(weights, assign=True)
    teacher = MultiCropWrapper(backbone, DINOHead(192, out_dim=64, hidden_dim=32, bottleneck_dim=16)).state_dict()
    config = TrainConfig(arch=arch, patch_size=PATCH, global_size=SIZE, out_dim=64).to_dict()
    return {
        "student": {k: v + 0.5 for k, v in teacher.items()},
        "teacher": teacher,
        "optimizer": {},
        "dino_loss": {"center": torch.zeros(1, 64)},
        "epoch": 5,
        "step": 50,
        "config": config,
        "rng": rng_state(),
        "knn": {"top1": 33.0, "top5": 70.0, "epoch": 5, "k": 20},
        "history": [],
    }


def write_file(kind: str, weights: dict, folder: Path, timm_state: dict | None = None) -> Path:
    """Write ``weights`` (or ``timm_state`` for the timm layouts) in the layout ``kind``; return the path."""
    if kind == "official_backbone":
        path = folder / "dino_vittiny16_pretrain.pth"
        torch.save(dict(weights), path)
    elif kind == "official_full":
        path = folder / "dino_vittiny16_pretrain_full_checkpoint.pth"
        torch.save(official_full_checkpoint(weights, "backbone."), path)
    elif kind == "official_full_ddp_teacher":
        path = folder / "ddp_full_checkpoint.pth"
        torch.save(official_full_checkpoint(weights, "module.backbone."), path)
    elif kind == "timm_pth":
        path = folder / "vit_tiny.pth"
        torch.save(timm_state, path)
    elif kind == "timm_bin":
        path = folder / "pytorch_model.bin"
        torch.save(timm_state, path)
    elif kind == "timm_safetensors":
        path = folder / "model.safetensors"
        save_file({k: v.contiguous() for k, v in timm_state.items()}, str(path))
    elif kind == "project":
        path = folder / "checkpoint.pth"
        save_checkpoint(project_checkpoint(weights), path)
    else:
        raise ValueError(kind)
    return path


@pytest.mark.parametrize(
    "kind,expected_format",
    [
        ("official_backbone", FORMAT_OFFICIAL_BACKBONE),
        ("official_full", FORMAT_OFFICIAL_FULL),
        ("official_full_ddp_teacher", FORMAT_OFFICIAL_FULL),
        ("timm_pth", FORMAT_OFFICIAL_BACKBONE),
        ("timm_bin", FORMAT_OFFICIAL_BACKBONE),
        ("timm_safetensors", FORMAT_SAFETENSORS),
        ("project", FORMAT_PROJECT),
    ],
)
def test_each_layout_loads_the_teacher_backbone(kind, expected_format, weights, timm_weights, tmp_path):
    path = write_file(kind, weights, tmp_path, timm_weights)
    backbone, provenance = load_backbone_weights(path, ARCH, PATCH, SIZE)
    loaded = backbone.state_dict()
    assert set(loaded) == set(weights)
    for key, value in weights.items():
        assert torch.equal(loaded[key], value), key
    assert provenance["source_format"] == expected_format
    assert provenance["source_sha256"] == sha256_file(path)
    if kind.startswith("official_full"):
        assert provenance["epoch"] == OFFICIAL_EPOCH and provenance["training_args"]["arch"] == "vit_tiny"
    if kind == "project":
        assert provenance["epoch"] == 5 and provenance["knn"]["top1"] == 33.0
        assert provenance["training_config"]["arch"] == ARCH


def test_position_embeddings_resampled_to_image_size(tmp_path):
    """Official releases are trained at 224 px; importing at another size resamples pos_embed like timm."""
    torch.manual_seed(3)
    at_224 = build_backbone(ARCH, PATCH, 224).state_dict()
    path = tmp_path / "dino_224.pth"
    torch.save(at_224, path)
    backbone, _ = load_backbone_weights(path, ARCH, PATCH, SIZE)
    loaded = backbone.state_dict()
    expected = timm.layers.resample_abs_pos_embed(
        at_224["pos_embed"], new_size=[SIZE // PATCH] * 2, num_prefix_tokens=1
    )
    assert loaded["pos_embed"].shape == (1, (SIZE // PATCH) ** 2 + 1, 192)
    torch.testing.assert_close(loaded["pos_embed"], expected)
    assert torch.equal(loaded["blocks.5.attn.qkv.weight"], at_224["blocks.5.attn.qkv.weight"])


@pytest.mark.slow  # a real ONNX export
def test_cli_import_official_full_checkpoint_parity(weights, tmp_path, capsys, data_dir):
    path = write_file("official_full", weights, tmp_path)
    out = tmp_path / "models" / "dino-tiny"
    rc = cli.main(
        [
            "import",
            "--weights",
            str(path),
            "--arch",
            ARCH,
            "--patch-size",
            str(PATCH),
            "--image-size",
            str(SIZE),
            "--output",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "onnx.checker passed" in printed
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["name"] == "dino-tiny" and meta["image_size"] == SIZE and meta["dynamic_hw"] is True
    assert meta["provenance"]["source_format"] == FORMAT_OFFICIAL_FULL
    assert meta["provenance"]["source_sha256"] == sha256_file(path)
    assert meta["provenance"]["epoch"] == OFFICIAL_EPOCH

    # the PyTorch model built directly from the file's teacher entries, without the importer
    teacher = torch.load(path, weights_only=False)["teacher"]
    model = build_backbone(ARCH, PATCH, SIZE)
    model.load_state_dict({k.removeprefix("backbone."): v for k, v in teacher.items() if k.startswith("backbone.")})
    images = _photos(data_dir)
    session = ort.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])
    onnx_out = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {"image": images.numpy()}), strict=True))
    reference = reference_outputs(model.eval(), images)
    diffs = {k: float(np.abs(onnx_out[k] - reference[k].numpy()).max()) for k in OUTPUT_NAMES}
    print(f"imported official checkpoint, ORT vs PyTorch: {diffs}")
    assert max(diffs.values()) <= FP32_ATOL, diffs


def _import_fails(path: Path, tmp_path: Path, capsys, *extra: str, arch: str = ARCH, patch: int = PATCH) -> str:
    out = tmp_path / "models" / "bad"
    rc = cli.main(
        [
            "import",
            "--weights",
            str(path),
            "--arch",
            arch,
            "--patch-size",
            str(patch),
            "--image-size",
            str(SIZE),
            "--output",
            str(out),
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err and err.startswith("dino import: ")
    assert not out.exists()
    return err


def test_missing_and_unexpected_keys_are_listed(weights, tmp_path, capsys):
    state = {k: v for k, v in weights.items() if k != "norm.weight"}
    state["blocks.0.attn.extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    err = _import_fails(path, tmp_path, capsys)
    assert "missing keys (1)" in err and "norm.weight" in err
    assert "unexpected keys (1)" in err and "blocks.0.attn.extra.weight" in err


def test_shapes_of_another_arch_are_listed(weights, tmp_path, capsys):
    path = write_file("official_backbone", weights, tmp_path)
    err = _import_fails(path, tmp_path, capsys, arch="vit_small")
    assert "shape mismatches" in err and "blocks.0.attn.qkv.weight: file (576, 192) vs model (1152, 384)" in err
    assert "... and" in err  # long lists are summarised
    err = _import_fails(path, tmp_path, capsys, patch=8)
    assert "patch_embed.proj.weight: file (192, 3, 16, 16) vs model (192, 3, 8, 8)" in err


def test_project_checkpoint_of_another_arch(weights, tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(project_checkpoint(weights, arch="vit_small"), path)
    with pytest.raises(WeightsError, match="trained as vit_small/16"):
        load_backbone_weights(path, ARCH, PATCH, SIZE)


def test_unreadable_and_unsafe_files_are_refused(tmp_path, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    assert "cannot load as a torch file" in _import_fails(garbage, tmp_path, capsys)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"payload": NotAllowed()}, unsafe)
    assert "cannot load as a torch file" in _import_fails(unsafe, tmp_path, capsys)
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x00" * 16)
    assert "cannot read as safetensors" in _import_fails(bad_safetensors, tmp_path, capsys)
    assert "no such file" in _import_fails(tmp_path / "missing.pth", tmp_path, capsys)
