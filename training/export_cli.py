"""``dino export``: a ``dino train`` checkpoint's teacher backbone as an ONNX model folder.

Also the options and the summary shared with ``dino import`` (:mod:`training.import_weights`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch.nn as nn

from dino.model_folder import ModelMetadata
from training.export import DEFAULT_OPSET, FP16_FILE, MIN_OPSET, MODEL_FILE, export_backbone
from training.export_graph import ExportError
from training.quantize import DEFAULT_CALIBRATION_IMAGES, DEFAULT_METHOD, INT8_FILE, METHODS, Int8Options
from training.weights import WeightsError, load_checkpoint_teacher


def add_export_options(parser: argparse.ArgumentParser, model_name_flag: str = "--name") -> None:
    """Options shared by ``dino export`` and ``dino import`` (where ``--name`` picks an official
    release, so the model is named with ``--model-name``)."""
    parser.add_argument("--output", required=True, help="model folder to write, e.g. models/NAME")
    parser.add_argument(
        model_name_flag, dest="model_name", default=None, help="model name (default: the output folder's name)"
    )
    parser.add_argument(
        "--resize-size",
        type=int,
        default=None,
        help="shorter-side resize before the centre crop (default: image size * 8/7)",
    )
    parser.add_argument("--fp16", action="store_true", help=f"also write {FP16_FILE} (float16 compute) for GPU serving")
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET}, minimum {MIN_OPSET})"
    )
    int8 = parser.add_argument_group("int8 (CPU serving)")
    int8.add_argument("--int8", action="store_true", help=f"also write {INT8_FILE} and measure its drop")
    int8.add_argument(
        "--calibration",
        default=None,
        help="image folder for --int8: static ranges and the float32/int8 agreement are measured on it",
    )
    int8.add_argument(
        "--int8-method",
        choices=METHODS,
        default=DEFAULT_METHOD,
        help=f"dynamic (per-batch activation ranges, the faster here) or static (calibrated); default {DEFAULT_METHOD}",
    )
    int8.add_argument(
        "--calibration-images",
        type=int,
        default=DEFAULT_CALIBRATION_IMAGES,
        help=f"images of --calibration to use, evenly spread (default {DEFAULT_CALIBRATION_IMAGES})",
    )
    int8.add_argument(
        "--int8-knn-train",
        default=None,
        help="labelled gallery (root/<class>/<image>): measure the k-NN top-1 drop; 'DINO_PRECISION=auto' "
        "serves int8 only when a drop of at most 0.5 points was measured",
    )
    int8.add_argument("--int8-knn-val", default=None, help="labelled queries for the k-NN drop")
    int8.add_argument(
        "--int8-knn-max-images", type=int, default=0, help="cap of each k-NN folder, evenly across classes (0: all)"
    )


def int8_options(args: argparse.Namespace) -> Int8Options | None:
    """The :class:`Int8Options` of the command line (None without ``--int8``)."""
    if not args.int8:
        if args.calibration or args.int8_knn_train or args.int8_knn_val:
            raise ExportError("--calibration and --int8-knn-* only apply with --int8")
        return None
    if not args.calibration:
        raise ExportError("--int8 needs --calibration DIR (a folder of images like the ones to be served)")
    return Int8Options(
        calibration=Path(args.calibration),
        method=args.int8_method,
        max_images=args.calibration_images,
        knn_train=Path(args.int8_knn_train) if args.int8_knn_train else None,
        knn_val=Path(args.int8_knn_val) if args.int8_knn_val else None,
        knn_max_images=args.int8_knn_max_images,
    )


def export_with_options(
    backbone: nn.Module, args: argparse.Namespace, *, arch: str, patch_size: int, image_size: int, provenance: dict
) -> ModelMetadata:
    """:func:`export_backbone` into ``args.output`` with the options of :func:`add_export_options`."""
    output = Path(args.output)
    return export_backbone(
        backbone,
        output,
        name=args.model_name or output.name,
        arch=arch,
        patch_size=patch_size,
        image_size=image_size,
        resize_size=args.resize_size,
        provenance=provenance,
        fp16=args.fp16,
        int8=int8_options(args),
        opset=args.opset,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by 'dino train' (RUN/checkpoint.pth)")
    parser.add_argument(
        "--image-size", type=int, default=None, help="native resolution (default: the run's global crop size)"
    )
    parser.add_argument(
        "--knn-result",
        default=None,
        help="JSON written by 'dino knn --checkpoint' for this checkpoint, recorded in model.json",
    )
    add_export_options(parser)


def print_summary(metadata: ModelMetadata, output_dir: Path) -> None:
    """What ``dino export``/``dino import`` print: files, sizes, checker, export time, parity."""
    print(
        f"wrote {output_dir}/  ({metadata['arch']}/{metadata['patch_size']}, {metadata['image_size']} px, "
        f"dynamic H/W: {metadata['dynamic_hw']})"
    )
    for filename in (MODEL_FILE, FP16_FILE):
        info = metadata["export"].get(filename)
        if info is None:
            continue
        diffs = info["ort_cpu_max_abs_diff"]
        parity = "not checked" if diffs is None else ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
        print(
            f"  {filename}: {info['file_bytes'] / 1e6:.1f} MB, onnx.checker {info['onnx_checker']}, "
            f"exported in {info['export_seconds']:.1f} s, ORT CPU vs PyTorch max abs diff: {parity}"
        )
    int8 = metadata.get("int8")
    if int8 is not None:
        agreement = int8["measured"]["agreement"]
        knn = int8["measured"].get("knn")
        drop = (
            "k-NN drop not measured (give --int8-knn-train/--int8-knn-val)"
            if knn is None
            else f"k-NN top-1 {knn['fp32_top1']:.2f}% -> {knn['int8_top1']:.2f}% (drop {knn['drop_points']:.2f} points)"
        )
        print(
            f"  {INT8_FILE}: {int8['bytes'] / 1e6:.1f} MB, {int8['method']} int8 in {int8['quantize_seconds']:.1f} s; "
            f"on {agreement['images']} calibration images: embedding cosine mean "
            f"{agreement['embedding_cosine_mean']:.4f} "
            f"(min {agreement['embedding_cosine_min']:.4f}), attention correlation "
            f"{agreement['attention_correlation_mean']:.4f}; {drop}"
        )
    print(f"  sha256 {metadata['sha256']}")


#: libraries whose INFO logs describe the exporter's internal graph passes, not the user's model
NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")


def configure_logging() -> None:
    """INFO logs to stderr for the CLI commands (unless the caller configured logging already)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def read_knn_result(path: str | Path, meta: dict) -> dict:
    """A ``dino knn --checkpoint`` result file, checked to belong to the exported checkpoint (same epoch)."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"--knn-result {path}: cannot read a JSON result ({exc})") from exc
    if not isinstance(result, dict) or not {"top1", "top5", "epoch"} <= set(result):
        raise ExportError(f"--knn-result {path}: not a 'dino knn --checkpoint' result (needs top1, top5, epoch)")
    if result["epoch"] != meta.get("epoch"):
        raise ExportError(
            f"--knn-result {path}: evaluates epoch {result['epoch']}, "
            f"but the checkpoint is at epoch {meta.get('epoch')}"
        )
    return result


def main(args: argparse.Namespace) -> int:
    configure_logging()
    try:
        backbone, config, meta = load_checkpoint_teacher(args.checkpoint)
        output = Path(args.output)
        provenance = {**meta, "training_config": config}
        if args.knn_result:
            provenance["knn_eval"] = read_knn_result(args.knn_result, meta)
        metadata = export_with_options(
            backbone,
            args,
            arch=config["arch"],
            patch_size=int(config["patch_size"]),
            image_size=args.image_size or int(config["global_size"]),
            provenance=provenance,
        )
    except (ExportError, WeightsError) as exc:
        print(f"dino export: {exc}", file=sys.stderr)
        return 1
    print_summary(metadata, output)
    return 0
