"""CPU inference by precision and graph: float32 (opset 18 and 20), optimised float32, int8 dynamic and
int8 static, img/s by batch size, with the int8 files' agreement with float32.

Why this exists: the CPU serves at the matmul roofline in float32, so only cheaper arithmetic moves
it (int8 on AVX-512 VNNI), and the int8 method, the opset and the serving batch cap were chosen
from these numbers (``training/quantize.py``, ``training/export.py``, ``service/settings.py``).

Variants, each made in a temporary folder from the same weights:

- ``fp32 opset18``: the export as it was before (GELU as erf, mul, add: five nodes);
- ``fp32``: the current export (opset 20: one ``Gelu`` node);
- ``fp32 ort-offline``: ``fp32`` with ONNX Runtime's graph optimisations applied offline and saved;
- ``fp32 fused``: ``fp32`` through onnxruntime.transformers' optimiser (bias+GELU and LayerNorm fusion;
  its attention fusion does not match the exported graph, and must not: the last block's attention
  weights are an output);
- ``int8 dynamic`` (the default of ``dino export --int8``), ``int8 static`` (QDQ, min/max ranges
  calibrated on real photos) and ``int8 dynamic opset18``.

Models: a random-init ViT-S/16 at 224 px (speed does not depend on the weights) and, with
``--checkpoint``, a ``dino train`` checkpoint (the default model's). Each measurement is wall-clock
img/s with ``--threads`` intra-op threads; the variants are measured in interleaved rounds and the
median is reported, so that a load change on a shared machine hits every variant alike. The
agreement of each int8 file with float32 (embedding cosine, attention-map correlation) is measured on
real photos (ImageNet sample + Imagenette val).

Usage::

    .venv/bin/python benchmarks/precision.py --checkpoint runs/NAME/checkpoint.pth

Writes ``benchmarks/results/precision_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.inference import machine_info, time_runs  # noqa: E402
from dino.data_dir import data_dir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
BUILTIN = {"arch": "vit_small", "patch_size": 16, "image_size": 224}
BATCHES = (1, 2, 4, 8, 16, 32, 64)
SEED = 0
#: real photos for the agreement and the static calibration (ImageNet sample, then Imagenette val)
AGREEMENT_PHOTOS = 128

log = logging.getLogger("benchmark")


def real_batches(meta: dict, count: int) -> list[np.ndarray]:
    """Real photos through the model's evaluation transform, in batches of 32."""
    from training.quantize import calibration_batches

    root = data_dir()
    batches: list[np.ndarray] = []
    for folder in (root / "imagenet-sample", root / "imagenette" / "val"):
        if folder.is_dir():
            batches += calibration_batches(meta, folder, count // 2)  # type: ignore[arg-type]
    if not batches:
        raise SystemExit(f"precision benchmark: no photos under {root} (set DINO_DATA_DIR)")
    return batches


def make_variants(folder18: Path, folder20: Path, tmp: Path, calibration: list[np.ndarray]) -> dict[str, Path]:
    """Every variant's ONNX file, from the two exports (opset 18 and 20) of the same weights."""
    import onnxruntime as ort
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from training.quantize import quantize_file

    meta = json.loads((folder20 / "model.json").read_text())
    variants = {"fp32 opset18": folder18 / "model.onnx", "fp32": folder20 / "model.onnx"}

    offline = tmp / f"{folder20.name}-ort-offline.onnx"
    options = ort.SessionOptions()
    # EXTENDED, not ALL: ALL's layout transformations are specific to the machine that saves them
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(offline)
    ort.InferenceSession(str(variants["fp32"]), options, providers=["CPUExecutionProvider"])
    variants["fp32 ort-offline"] = offline

    fused = tmp / f"{folder20.name}-fused.onnx"
    fusion = FusionOptions("vit")
    fusion.enable_skip_layer_norm = False  # measured slower than plain LayerNorm + Add on this graph
    optimized = optimize_model(
        str(variants["fp32"]),
        model_type="vit",
        num_heads=meta["num_heads"],
        hidden_size=meta["embed_dim"],
        opt_level=0,
        optimization_options=fusion,
    )
    optimized.save_model_to_file(str(fused))
    variants["fp32 fused"] = fused

    for name, source, method in (
        ("int8 dynamic", variants["fp32"], "dynamic"),
        ("int8 static", variants["fp32"], "static"),
        ("int8 dynamic opset18", variants["fp32 opset18"], "dynamic"),
    ):
        target = tmp / f"{folder20.name}-{name.replace(' ', '-')}.onnx"
        quantize_file(source, target, method, meta["input_name"], calibration)
        variants[name] = target
    return variants


def agreements(variants: dict[str, Path], input_name: str, batches: list[np.ndarray]) -> dict[str, dict]:
    """Embedding cosine and attention correlation of every variant against ``fp32``."""
    from training.quantize import agreement_with_fp32, cpu_session

    reference = cpu_session(variants["fp32"])
    return {
        name: agreement_with_fp32(reference, cpu_session(path), input_name, batches)
        for name, path in variants.items()
        if name != "fp32"
    }


def measure(
    variants: dict[str, Path], image_size: int, batches: tuple[int, ...], args: argparse.Namespace
) -> dict[str, dict[int, dict[str, Any]]]:
    """img/s of every variant at every batch size: medians over interleaved rounds."""
    import onnxruntime as ort

    sessions = {}
    for name, path in variants.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(SEED)
    inputs = {b: rng.standard_normal((b, 3, image_size, image_size)).astype(np.float32) for b in batches}
    samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in variants}
    for round_ in range(args.rounds):
        for b in batches:
            for name, session in sessions.items():
                feed = {"image": inputs[b]}
                result = time_runs(lambda s=session, f=feed: s.run(None, f), b, 1, args.min_seconds, 2)
                samples[name][b].append(result["img_per_s"])
        log.info("round %d/%d done (load average %.2f)", round_ + 1, args.rounds, os.getloadavg()[0])
    return {
        name: {
            b: {"img_per_s": round(statistics.median(v), 2), "rounds": v, "vs_fp32": None} for b, v in per_batch.items()
        }
        for name, per_batch in samples.items()
    }


def bench_model(label: str, backbone: Any, meta_args: dict, tmp: Path, args: argparse.Namespace) -> dict:
    """Export ``backbone`` twice (opset 18, 20), make the variants, measure speed and agreement."""
    from training.export import export_backbone

    folders = {}
    for opset in (18, 20):
        folder = tmp / f"{label}-opset{opset}"
        export_backbone(backbone, folder, name=folder.name, opset=opset, provenance={"source": label}, **meta_args)
        folders[opset] = folder
    meta = json.loads((folders[20] / "model.json").read_text())
    photos = real_batches(meta, AGREEMENT_PHOTOS)
    variants = make_variants(folders[18], folders[20], tmp, photos)
    speeds = measure(variants, meta["image_size"], tuple(args.batch_sizes), args)
    for per_batch in speeds.values():
        for b, row in per_batch.items():
            row["vs_fp32"] = round(row["img_per_s"] / speeds["fp32 opset18"][b]["img_per_s"], 3)
    return {
        "model": label,
        "arch": meta["arch"],
        "patch_size": meta["patch_size"],
        "image_size": meta["image_size"],
        "files_mb": {name: round(path.stat().st_size / 1e6, 1) for name, path in variants.items()},
        "img_per_s": speeds,
        "agreement_vs_fp32": agreements(variants, meta["input_name"], photos),
    }


def print_tables(results: list[dict]) -> None:
    for result in results:
        batches = list(next(iter(result["img_per_s"].values())))
        print(f"\n{result['model']} ({result['arch']}/{result['patch_size']}, {result['image_size']} px): img/s")
        print(f"{'variant':<22}" + "".join(f"{'b' + str(b):>16}" for b in batches))
        for name, per_batch in result["img_per_s"].items():
            cells = "".join(f"{per_batch[b]['img_per_s']:>9.1f} ({per_batch[b]['vs_fp32']:.2f}x)" for b in batches)
            print(f"{name:<22}{cells}")
        print("agreement with fp32 on real photos:")
        for name, a in result["agreement_vs_fp32"].items():
            print(
                f"  {name:<22} embedding cosine mean {a['embedding_cosine_mean']:.5f} "
                f"min {a['embedding_cosine_min']:.5f}, attention correlation mean {a['attention_correlation_mean']:.5f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="a dino train checkpoint to measure too")
    parser.add_argument("--no-builtin", action="store_true", help="skip the random-init ViT-S/16 at 224 px")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement")
    parser.add_argument("--min-seconds", type=float, default=1.5, help="per measurement and round")
    parser.add_argument("--output", type=Path, default=RESULTS / "precision_cpu.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)

    import torch

    from training.backbone import build_backbone

    torch.manual_seed(SEED)
    results = []
    with tempfile.TemporaryDirectory(prefix="dino-precision-") as tmp_name:
        tmp = Path(tmp_name)
        if not args.no_builtin:
            backbone = build_backbone(BUILTIN["arch"], BUILTIN["patch_size"], BUILTIN["image_size"]).eval()
            results.append(bench_model("vit_small16-random", backbone, dict(BUILTIN), tmp, args))
        if args.checkpoint is not None:
            from training.weights import load_checkpoint_teacher

            backbone, config, _ = load_checkpoint_teacher(args.checkpoint)
            meta_args = {
                "arch": config["arch"],
                "patch_size": int(config["patch_size"]),
                "image_size": int(config["global_size"]),
            }
            results.append(bench_model(str(args.checkpoint), backbone, meta_args, tmp, args))
    report = {
        "benchmark": "precision",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine_info("cpu"),
        "threads": args.threads,
        "rounds": args.rounds,
        "load_average_end": os.getloadavg(),
        "results": results,
    }
    print_tables(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
