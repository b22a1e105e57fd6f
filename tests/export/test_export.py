"""``dino export``: ONNX graph contract, parity with PyTorch on real photos, model.json, fp16, visualisation.

One tiny random-init ViT (vit_tiny, patch 16, 64 px) is saved as a ``dino train`` checkpoint and
exported once through the CLI (module-scoped fixture); the tests then inspect that model folder.
That export takes ~15 s, so every test that uses it is marked ``slow``.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from dino import cli
from dino.model_folder import METADATA_FILE, OUTPUT_NAMES, sha256_file
from training.augmentation import eval_transform
from training.backbone import build_backbone
from training.checkpoint import rng_state, save_checkpoint
from training.config import TrainConfig
from training.export import FP16_FILE, MODEL_FILE, export_backbone
from training.export_graph import ExportError, reference_outputs
from training.head import DINOHead
from training.multicrop import MultiCropWrapper
from training.weights import load_checkpoint_teacher

ARCH, PATCH, SIZE = "vit_tiny", 16, 64
FP32_ATOL = 1e-4
#: float16 compute vs float32 reference (values after LayerNorm are O(1))
FP16_ATOL = {"embedding": 5e-2, "patch_tokens": 5e-2, "attention": 2e-3}
PHOTOS = (
    "n01440764_tench.JPEG",
    "n01530575_brambling.JPEG",
    "n01641577_bullfrog.JPEG",
    "n03908714_pencil_sharpener.JPEG",  # grayscale (mode L)
    "n01682714_American_chameleon.JPEG",
)
KNN = {"top1": 12.5, "top5": 40.0, "epoch": 3, "k": 20}
KNN_EVAL = {"top1": 14.0, "top5": 45.5, "epoch": 3, "n_train": 8969, "n_val": 3925}


def load_photos(data_dir: Path, size: int, resize: int | None = None, names=PHOTOS) -> torch.Tensor:
    """Real ImageNet photos through the evaluation transform, as one batch."""
    folder = data_dir / "imagenet-sample"
    transform = eval_transform(size, resize)
    return torch.stack([transform(Image.open(folder / n).convert("RGB")) for n in names])


_SESSIONS: dict[Path, ort.InferenceSession] = {}


def run_onnx(path: Path, images: torch.Tensor) -> dict[str, np.ndarray]:
    """ONNX Runtime CPU outputs by name (one session per file for the whole module)."""
    if path not in _SESSIONS:
        _SESSIONS[path] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(OUTPUT_NAMES, _SESSIONS[path].run(list(OUTPUT_NAMES), {"image": images.numpy()}), strict=True))


def max_diffs(onnx_out: dict[str, np.ndarray], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(np.abs(onnx_out[k] - reference[k].numpy()).max()) for k in OUTPUT_NAMES}


def _wrapper(seed: int) -> MultiCropWrapper:
    torch.manual_seed(seed)
    backbone = build_backbone(ARCH, PATCH, SIZE)
    return MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, out_dim=32, hidden_dim=32, bottleneck_dim=16))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint with the exact layout ``dino train`` writes (student and teacher differ)."""
    student, teacher = _wrapper(0), _wrapper(1)
    config = TrainConfig(arch=ARCH, patch_size=PATCH, global_size=SIZE, local_size=32, out_dim=32)
    optimizer = torch.optim.AdamW(student.parameters())
    state = {
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": optimizer.state_dict(),
        "dino_loss": {"center": torch.zeros(1, 32)},
        "epoch": 3,
        "step": 42,
        "config": config.to_dict(),
        "rng": rng_state(),
        "knn": KNN,
        "history": [{"epoch": 3, "loss": 10.2}],
    }
    path = tmp_path_factory.mktemp("run") / "checkpoint.pth"
    save_checkpoint(state, path)
    return path


@pytest.fixture(scope="module")
def teacher(checkpoint) -> torch.nn.Module:
    """The teacher backbone, rebuilt without the export module's loader."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["teacher"]
    with torch.device("meta"):  # no random init: the weights are assigned right away
        backbone = build_backbone(ARCH, PATCH, SIZE)
    backbone.load_state_dict(
        {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}, assign=True
    )
    return backbone.eval()


@pytest.fixture(scope="module")
def export_run(checkpoint, tmp_path_factory) -> tuple[Path, str]:
    """``dino export --fp16`` run once through the CLI: (model folder, what it printed)."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    knn_result = checkpoint.parent / "knn.json"  # what 'dino knn --checkpoint' writes
    knn_result.write_text(json.dumps(KNN_EVAL))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert (
            cli.main(
                [
                    "export",
                    "--checkpoint",
                    str(checkpoint),
                    "--output",
                    str(out),
                    "--fp16",
                    "--knn-result",
                    str(knn_result),
                ]
            )
            == 0
        )
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def model_dir(export_run) -> Path:
    return export_run[0]


@pytest.mark.slow
def test_cli_prints_checker_size_and_time(export_run):
    model_dir, printed = export_run
    print(printed)
    assert "onnx.checker passed" in printed and " MB" in printed and "exported in" in printed
    meta = json.loads((model_dir / METADATA_FILE).read_text())
    info = meta["export"][MODEL_FILE]
    assert info["onnx_checker"] == "passed"
    assert info["file_bytes"] == (model_dir / MODEL_FILE).stat().st_size
    assert info["export_seconds"] > 0
    assert max(info["ort_cpu_max_abs_diff"].values()) <= FP32_ATOL


@pytest.mark.slow
def test_model_json_contract(checkpoint, model_dir):
    meta = json.loads((model_dir / METADATA_FILE).read_text())
    assert meta["format_version"] == 1
    assert meta["name"] == "tiny"
    assert (meta["arch"], meta["patch_size"], meta["embed_dim"], meta["num_heads"]) == (ARCH, PATCH, 192, 3)
    assert (meta["image_size"], meta["resize_size"]) == (SIZE, round(SIZE * 8 / 7))
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert meta["input_name"] == "image" and meta["dynamic_hw"] is True and meta["opset"] >= 18
    assert meta["outputs"] == [
        {"name": "embedding", "shape": ["batch", 192]},
        {"name": "patch_tokens", "shape": ["batch", "num_patches", 192]},
        {"name": "attention", "shape": ["batch", 3, "num_patches"]},
    ]
    assert meta["file"] == MODEL_FILE and meta["sha256"] == sha256_file(model_dir / MODEL_FILE)
    assert meta["fp16_file"] == FP16_FILE and meta["fp16_sha256"] == sha256_file(model_dir / FP16_FILE)
    prov = meta["provenance"]
    assert prov["source_sha256"] == sha256_file(checkpoint)
    assert prov["epoch"] == 3 and prov["knn"] == KNN and prov["knn_eval"] == KNN_EVAL
    assert prov["training_config"]["arch"] == ARCH and prov["training_config"]["global_size"] == SIZE
    assert {"exported_at", "torch_version", "timm_version"} <= set(prov)


@pytest.mark.slow
def test_onnx_checker_and_io_names(model_dir):
    for filename in (MODEL_FILE, FP16_FILE):
        onnx.checker.check_model(str(model_dir / filename), full_check=True)
        graph = onnx.load(str(model_dir / filename)).graph
        dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
        assert [(v.name, dims(v)) for v in graph.input] == [("image", ["batch", 3, "height", "width"])]
        assert [(v.name, dims(v)) for v in graph.output] == [
            ("embedding", ["batch", 192]),
            ("patch_tokens", ["batch", "num_patches", 192]),
            ("attention", ["batch", 3, "num_patches"]),
        ]
        assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp16 file too


def test_loader_uses_teacher(checkpoint, teacher):
    backbone, config, meta = load_checkpoint_teacher(checkpoint)
    assert config["arch"] == ARCH and meta["epoch"] == 3 and meta["knn"] == KNN
    for key, value in teacher.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key


@pytest.mark.slow
def test_parity_on_real_photos_dynamic_batch(model_dir, teacher, data_dir):
    images = load_photos(data_dir, SIZE)
    reference = reference_outputs(teacher, images)
    full = run_onnx(model_dir / MODEL_FILE, images)
    single = run_onnx(model_dir / MODEL_FILE, images[:1])
    assert full["embedding"].shape == (len(PHOTOS), 192)
    assert full["patch_tokens"].shape == (len(PHOTOS), (SIZE // PATCH) ** 2, 192)
    assert full["attention"].shape == (len(PHOTOS), 3, (SIZE // PATCH) ** 2)
    diffs = max_diffs(full, reference)
    print(f"fp32 parity at {SIZE}px, batch {len(PHOTOS)}: {diffs}")
    assert max(diffs.values()) <= FP32_ATOL, diffs
    assert max(max_diffs(single, {k: v[:1] for k, v in reference.items()}).values()) <= FP32_ATOL
    # attention rows are softmax weights with the [CLS] column dropped (not renormalised)
    sums = full["attention"].sum(-1)
    assert np.all(full["attention"] >= 0) and np.all(sums <= 1 + 1e-5) and np.all(sums > 0)


@pytest.mark.slow
@pytest.mark.parametrize("height,width", [(96, 48), (32, 32)])
def test_parity_at_other_resolutions(model_dir, teacher, data_dir, height, width):
    """Dynamic H/W: the position embeddings are resampled (up and down) inside the graph like timm does."""
    images = torch.nn.functional.interpolate(load_photos(data_dir, SIZE)[:3], size=(height, width), mode="bilinear")
    out = run_onnx(model_dir / MODEL_FILE, images)
    assert out["attention"].shape == (3, 3, (height // PATCH) * (width // PATCH))
    diffs = max_diffs(out, reference_outputs(teacher, images))
    print(f"fp32 parity at {height}x{width}: {diffs}")
    assert max(diffs.values()) <= FP32_ATOL, diffs


@pytest.mark.slow
def test_fp16_model_close_to_fp32(model_dir, teacher, data_dir):
    images = load_photos(data_dir, SIZE)
    try:
        out = run_onnx(model_dir / FP16_FILE, images)
    except Exception as exc:  # CPU provider builds without float16 kernels
        pytest.skip(f"ONNX Runtime CPU cannot run the float16 model here: {exc}")
    assert all(v.dtype == np.float32 for v in out.values())
    diffs = max_diffs(out, reference_outputs(teacher, images))
    print(f"fp16 vs fp32 reference: {diffs}")
    for name, atol in FP16_ATOL.items():
        assert diffs[name] <= atol, diffs


def test_library_rejects_old_opset_and_bad_size(tmp_path):
    with torch.device("meta"):  # arguments are validated before the weights are touched
        backbone = build_backbone(ARCH, PATCH, SIZE)
    with pytest.raises(ExportError, match="opset"):
        export_backbone(backbone, tmp_path, name="x", arch=ARCH, patch_size=PATCH, image_size=SIZE, opset=17)
    with pytest.raises(ExportError, match="multiple of the patch size"):
        export_backbone(backbone, tmp_path, name="x", arch=ARCH, patch_size=PATCH, image_size=SIZE + 1)


def test_cli_errors_exit_nonzero_without_traceback(tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    assert cli.main(["export", "--checkpoint", str(missing), "--output", str(tmp_path / "m")]) == 1
    assert "no such file" in capsys.readouterr().err
    not_a_run = tmp_path / "weights.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 192)}, not_a_run)
    assert cli.main(["export", "--checkpoint", str(not_a_run), "--output", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "not a 'dino train' checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "m" / METADATA_FILE).exists()


def test_knn_result_of_another_epoch_is_refused(checkpoint, tmp_path, capsys):
    stale = tmp_path / "knn.json"
    stale.write_text(json.dumps({**KNN_EVAL, "epoch": 2}))
    args = ["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m"), "--knn-result", str(stale)]
    assert cli.main(args) == 1
    assert "evaluates epoch 2, but the checkpoint is at epoch 3" in capsys.readouterr().err
    stale.write_text("not json")
    assert cli.main(args) == 1
    assert "cannot read a JSON result" in capsys.readouterr().err
    assert not (tmp_path / "m" / METADATA_FILE).exists()


@pytest.mark.slow
def test_attention_grid_png(model_dir, tmp_path, data_dir):
    from training.visualize import attention_grid
    from training.visualize import main as visualize_main

    folder = data_dir / "imagenet-sample"
    photos = [folder / PHOTOS[0], folder / PHOTOS[3]]
    out = tmp_path / "grid.png"
    assert (
        visualize_main(["--model", str(model_dir), "--images", *map(str, photos), "--output", str(out), "--cell", "64"])
        == 0
    )
    with Image.open(out) as png:
        # rows: one per photo; columns: photo, mean overlay, 3 heads, thresholded mean
        expected = attention_grid(model_dir, photos, tmp_path / "again.png", cell=64).size
        assert png.size == expected
        assert png.size[0] >= 6 * 64 and png.size[1] >= 2 * 64


# --------------------------------------------------------------------------------------------------
# Attention mass inside hand-drawn object boxes (training.attention_boxes)
# --------------------------------------------------------------------------------------------------


def test_box_mask_follows_the_models_resize_and_centre_crop():
    from training.attention_boxes import box_patch_mask

    # 200x100 photo -> shorter side 73 -> 146x73 -> centre crop 64 starts 41 px from the left,
    # so the left half of the photo (x < 73) covers crop x < 32: patch columns 0-3 of 8
    left = box_patch_mask([0.0, 0.0, 0.5, 1.0], (200, 100), 64, 73, 8)
    right = box_patch_mask([0.5, 0.0, 1.0, 1.0], (200, 100), 64, 73, 8)
    assert left.shape == (8, 8)
    assert left[:, :4].all() and not left[:, 4:].any()
    assert right[:, 4:].all() and not right[:, :4].any()
    # a box in the cropped-away margin covers no patch
    assert not box_patch_mask([0.0, 0.0, 0.1, 1.0], (200, 100), 64, 73, 8).any()


def test_box_scores_of_known_maps():
    from training.attention_boxes import score_map

    box = np.zeros((4, 4), dtype=bool)
    box[:2, :2] = True  # a quarter of the grid
    on_object = np.where(box, 1.0, 0.0)[None] + 1e-9
    uniform = np.ones((1, 4, 4))
    avoiding = np.where(box, 0.0, 1.0)[None]
    s = score_map(on_object, box)
    assert s.box_area == 0.25 and s.mass_in_box == pytest.approx(1.0) and s.lift == pytest.approx(4.0)
    assert s.head_lift == pytest.approx([4.0])
    # 3 of the box's 4 equal patches hold the top 60% of the mass (75%): Jaccard 3/4
    assert s.jaccard == pytest.approx(0.75)
    assert score_map(uniform, box).lift == pytest.approx(1.0)
    assert score_map(avoiding, box).mass_in_box == 0.0 and score_map(avoiding, box).jaccard == 0.0
    # one head on the object, one avoiding it: the mean map is in between, the heads keep their lifts
    two_heads = score_map(np.concatenate([np.where(box, 1.0, 0.0)[None], avoiding / 3]), box)
    assert two_heads.head_lift == pytest.approx([4.0, 0.0]) and two_heads.mass_in_box == pytest.approx(0.5)


@pytest.mark.slow
def test_attention_boxes_cli_with_random_baseline(model_dir, data_dir, tmp_path, capsys):
    from training.attention_boxes import main as boxes_main

    boxes = tmp_path / "boxes.json"
    boxes.write_text(
        json.dumps(
            {
                "boxes": {
                    "n01440764_tench.JPEG": [0.08, 0.25, 0.86, 0.72],
                    "n01860187_black_swan.JPEG": [0.27, 0.0, 0.82, 0.9],
                }
            }
        )
    )
    out = tmp_path / "scores.json"
    args = [
        "--model",
        str(model_dir),
        "--random-baseline",
        "--boxes",
        str(boxes),
        "--images-dir",
        str(data_dir / "imagenet-sample"),
        "--output",
        str(out),
    ]
    assert boxes_main(args) == 0
    printed = capsys.readouterr().out
    assert "mean lift" in printed and "random-init" in printed
    result = json.loads(out.read_text())
    assert set(result["models"]) == {model_dir.name, "random-init"}
    for scores in result["models"].values():
        assert set(scores["per_image"]) == {"n01440764_tench.JPEG", "n01860187_black_swan.JPEG"}
        for s in scores["per_image"].values():
            assert 0 < s["box_area"] <= 1 and 0 <= s["mass_in_box"] <= 1 and 0 <= s["jaccard"] <= 1
            assert s["lift"] == pytest.approx(s["mass_in_box"] / s["box_area"])
            assert len(s["head_lift"]) == 3  # vit_tiny's heads
    # the two networks differ, so their attention does too
    a, b = (result["models"][k]["per_image"]["n01440764_tench.JPEG"]["mass_in_box"] for k in result["models"])
    assert a != b


@pytest.mark.slow
@pytest.mark.parametrize(
    "content, message",
    [
        ({"boxes": {"n01440764_tench.JPEG": [0.5, 0.2, 0.4, 0.9]}}, "x0 < x1"),
        ({"boxes": {"no_such_photo.JPEG": [0.1, 0.1, 0.9, 0.9]}}, "no such photo"),
        ({"photos": []}, "cannot read a box file"),
    ],
)
def test_attention_boxes_cli_refuses_bad_input(model_dir, data_dir, tmp_path, capsys, content, message):
    from training.attention_boxes import main as boxes_main

    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(content))
    args = ["--model", str(model_dir), "--boxes", str(boxes), "--images-dir", str(data_dir / "imagenet-sample")]
    assert boxes_main(args) == 1
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# int8 (dino export --int8)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_run(checkpoint, data_dir, tmp_path_factory) -> tuple[Path, str]:
    """``dino export --int8`` with real calibration photos and a small labelled k-NN: (folder, printed)."""
    out = tmp_path_factory.mktemp("models") / "tiny-int8"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(
            [
                "export",
                "--checkpoint",
                str(checkpoint),
                "--output",
                str(out),
                "--int8",
                "--calibration",
                str(data_dir / "imagenet-sample"),
                "--calibration-images",
                "40",
                "--int8-knn-train",
                str(data_dir / "imagenette" / "train"),
                "--int8-knn-val",
                str(data_dir / "imagenette" / "val"),
                "--int8-knn-max-images",
                "50",
            ]
        )
    assert code == 0
    return out, printed.getvalue()


@pytest.mark.slow
def test_int8_export_records_method_calibration_and_measured_drop(int8_run):
    folder, printed = int8_run
    meta = json.loads((folder / METADATA_FILE).read_text())
    assert meta["int8_file"] == "model_int8.onnx"
    assert meta["int8_sha256"] == sha256_file(folder / "model_int8.onnx")
    record = meta["int8"]
    assert record["method"] == "dynamic" and record["calibration"]["images"] == 40
    assert record["node_counts"]["DynamicQuantizeLinear"] > 0 and record["node_counts"]["MatMulInteger"] > 0
    agreement = record["measured"]["agreement"]
    assert agreement["images"] == 40 and agreement["embedding_cosine_min"] > 0.98
    knn = record["measured"]["knn"]
    assert knn["n_train"] == knn["n_val"] == 50
    assert record["knn_drop_points"] == pytest.approx(knn["fp32_top1"] - knn["int8_top1"], abs=0.01)
    assert (folder / "model_int8.onnx").stat().st_size < (folder / "model.onnx").stat().st_size / 2.5
    assert "model_int8.onnx" in printed and "k-NN top-1" in printed


@pytest.mark.slow
def test_int8_model_gives_the_three_outputs_of_the_fp32_model(int8_run, data_dir):
    folder, _ = int8_run
    images = load_photos(data_dir, SIZE)
    fp32, int8 = run_onnx(folder / MODEL_FILE, images), run_onnx(folder / "model_int8.onnx", images)
    for name in OUTPUT_NAMES:
        assert fp32[name].shape == int8[name].shape
    cosine = np.sum(fp32["embedding"] * int8["embedding"], 1) / (
        np.linalg.norm(fp32["embedding"], axis=1) * np.linalg.norm(int8["embedding"], axis=1)
    )
    assert cosine.min() > 0.98
    assert np.abs(fp32["attention"] - int8["attention"]).max() < 0.05


@pytest.mark.slow
def test_reexport_without_int8_removes_the_stale_file(int8_run, checkpoint, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(int8_run[0], folder)
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--output", str(folder)]) == 0
    assert not (folder / "model_int8.onnx").exists()
    assert "int8_file" not in json.loads((folder / METADATA_FILE).read_text())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--int8"], "--int8 needs --calibration"),
        (["--calibration", "PHOTOS"], "only apply with --int8"),
        (["--int8", "--calibration", "/nonexistent-folder"], "not a folder of images"),
        (["--int8", "--calibration", "PHOTOS", "--int8-knn-train", "PHOTOS"], "go together"),
        (["--int8", "--calibration", "PHOTOS", "--int8-method", "fp4"], None),  # argparse: exit 2
    ],
)
def test_int8_option_errors_are_one_line(checkpoint, data_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "m"
    extra = [str(data_dir / "imagenet-sample") if arg == "PHOTOS" else arg for arg in extra]
    if message is None:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["export", "--checkpoint", str(checkpoint), "--output", str(out), *extra])
        assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
        return
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--output", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (out / METADATA_FILE).exists()
