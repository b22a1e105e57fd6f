"""int8 models for the CPU: ``model_int8.onnx`` next to ``model.onnx`` (``dino export --int8``).

Why int8: on a CPU with AVX-512 VNNI (or AVX-VNNI) ONNX Runtime multiplies uint8 x int8 matrices
several times faster than float32, and the ViT's matrix products (qkv, projection, MLP) are most
of its time. Published int8 ViTs run about 2.5x faster for a 0.75-2 point top-1 drop.

The method is **dynamic quantisation** (``onnxruntime.quantization.quantize_dynamic``): the weights
of every ``MatMul`` with a constant weight become int8, per output channel (symmetric); the
activations entering them are quantised to uint8 per batch at run time, and ONNX Runtime fuses the
pair into ``DynamicQuantizeMatMul``. It was chosen over static QDQ quantisation (calibrated ranges)
by measurement (``benchmarks/precision.py``): on ViT-S/16 at 224 px, batch 8, static QDQ ran at
1.49x float32 against 2.09x for dynamic (its Quantize/Dequantize pairs around every product cost
more than the per-batch ranges they save), and agreed less with float32 (embedding cosine 0.9986
against 0.9993 on real photos). ``--int8-method static`` stays available (calibrated on
``--calibration`` images) for comparison.

What stays float32: LayerNorm, GELU, the softmax, the two attention products whose operands are
both activations (``q k^T`` and ``attn v``), the patch-embedding convolution and the position
embedding resampling. So the ``attention`` output is still a float32 softmax, and the three outputs
still come from one pass.

The drop is measured, not assumed (:func:`measure_int8`): on the calibration images, the cosine
between the float32 and int8 embeddings and the correlation of their attention maps; with labelled
folders, the k-NN top-1 (DINO protocol) of both files on the same images. ``model.json`` records the
method, the calibration images and these numbers; the service's ``DINO_PRECISION=auto`` serves the
int8 file on the CPU only when the recorded k-NN drop is at most 0.5 points.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from dino.images import list_image_files, load_rgb
from dino.model_folder import ModelMetadata, sha256_file
from training.augmentation import eval_transform
from training.export_graph import ExportError
from training.knn import DEFAULT_K, DEFAULT_TEMPERATURE, extract_features, labelled_folder, weighted_knn

log = logging.getLogger(__name__)

INT8_FILE = "model_int8.onnx"
METHODS = ("dynamic", "static")
DEFAULT_METHOD = "dynamic"
#: the ops whose constant weights become int8 (Gemm does not occur in the exported ViT graphs)
QUANTIZED_OPS = ("MatMul",)
FLOAT_OPS_NOTE = (
    "LayerNorm, GELU, softmax, the attention products q k^T and attn v, the patch-embedding convolution "
    "and the position-embedding resampling stay float32"
)
#: images of --calibration used for static ranges and for the embedding/attention agreement
DEFAULT_CALIBRATION_IMAGES = 256
#: images per onnxruntime call while calibrating and measuring
BATCH = 32
#: k-NN drop (points of top-1) up to which DINO_PRECISION=auto serves int8 on the CPU
AUTO_INT8_MAX_DROP = 0.5


@dataclass(frozen=True)
class Int8Options:
    """What ``--int8`` asks for: the method, the calibration images and the optional k-NN folders."""

    calibration: Path
    method: str = DEFAULT_METHOD
    max_images: int = DEFAULT_CALIBRATION_IMAGES
    knn_train: Path | None = None  #: labelled gallery (root/<class>/<image>) for the k-NN drop
    knn_val: Path | None = None  #: labelled queries
    knn_max_images: int = 0  #: cap of each k-NN folder, evenly across classes (0: all)

    def check(self) -> None:
        """Fail before any export work on options that cannot be met."""
        if self.method not in METHODS:
            raise ExportError(f"--int8-method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not self.calibration.is_dir():
            raise ExportError(f"--calibration {self.calibration}: not a folder of images")
        if not list_image_files(self.calibration):
            raise ExportError(f"--calibration {self.calibration}: no images found")
        if (self.knn_train is None) != (self.knn_val is None):
            raise ExportError("--int8-knn-train and --int8-knn-val go together")
        for folder in (self.knn_train, self.knn_val):
            if folder is not None and not folder.is_dir():
                raise ExportError(f"k-NN folder {folder}: not a folder")


def cpu_session(path: Path) -> Any:
    """An onnxruntime CPU session of ``path`` with every graph optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def calibration_batches(metadata: ModelMetadata, folder: Path, max_images: int) -> list[np.ndarray]:
    """The first ``max_images`` images of ``folder`` (sorted, evenly spread) through the model's
    evaluation transform, as float32 batches [B, 3, H, W]."""
    files = list_image_files(folder)
    if max_images and len(files) > max_images:
        step = len(files) / max_images
        files = [files[int(i * step)] for i in range(max_images)]
    transform = eval_transform(metadata["image_size"], metadata["resize_size"], metadata["mean"], metadata["std"])
    tensors = []
    for path in files:
        try:
            tensors.append(transform(load_rgb(path)).numpy())
        except (OSError, ValueError) as exc:  # an unreadable file among the images: skip it, say so
            log.warning("calibration: skipping %s (%s)", path, exc)
    if not tensors:
        raise ExportError(f"--calibration {folder}: none of the images could be read")
    stacked = np.stack(tensors)
    return [stacked[i : i + BATCH] for i in range(0, len(stacked), BATCH)]


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol over preprocessed batches."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]):
        self._feeds: Iterator[dict[str, np.ndarray]] = iter({input_name: b} for b in batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # part of the protocol; a single pass is enough here
        pass


def quantize_file(
    source: Path, target: Path, method: str, input_name: str, calibration: Sequence[np.ndarray]
) -> dict[str, Any]:
    """Write the int8 version of ``source`` to ``target``; returns what was done (for model.json)."""
    start = time.perf_counter()
    root = logging.getLogger()
    root_level = root.level
    # onnxruntime's quantiser logs every tensor it skips on the root logger: not news for the user
    root.setLevel(max(root_level, logging.WARNING))
    try:
        return _quantize(source, target, method, input_name, calibration, start)
    finally:
        root.setLevel(root_level)


def _quantize(
    source: Path, target: Path, method: str, input_name: str, calibration: Sequence[np.ndarray], start: float
) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".int8-") as tmp:
        # shape inference and constant folding first, as onnxruntime recommends before quantising
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantized = Path(tmp) / target.name
        extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
        if method == "dynamic":
            quantize_dynamic(
                str(prepared),
                str(quantized),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=list(QUANTIZED_OPS),
                extra_options=extra,
            )
            activations = "uint8, range measured per batch at run time"
        else:
            quantize_static(
                str(prepared),
                str(quantized),
                _CalibrationReader(input_name, calibration),  # a duck-typed CalibrationDataReader
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(QUANTIZED_OPS),
                calibrate_method=CalibrationMethod.MinMax,
                extra_options=extra,
            )
            activations = f"uint8, ranges calibrated (min/max) on {sum(len(b) for b in calibration)} images"
        os.replace(quantized, target)
    model = onnx.load(str(target), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {
        "method": method,
        "weights": "int8, symmetric, per output channel",
        "activations": activations,
        "quantized_ops": list(QUANTIZED_OPS),
        "float32_ops": FLOAT_OPS_NOTE,
        "quantize_seconds": round(time.perf_counter() - start, 2),
        "node_counts": dict(sorted(counts.items())),
    }


class OnnxFeatures(nn.Module):
    """An ONNX file's ``embedding`` output behind a torch module, so that :mod:`training.knn` can
    evaluate exported files exactly as it evaluates checkpoints."""

    def __init__(self, path: Path, input_name: str):
        super().__init__()
        self.session = cpu_session(path)
        self.input_name = input_name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (embedding,) = self.session.run(["embedding"], {self.input_name: images.numpy()})
        return torch.from_numpy(embedding)


def agreement_with_fp32(fp32: Any, int8: Any, input_name: str, batches: Sequence[np.ndarray]) -> dict[str, float]:
    """Cosine of the embeddings and Pearson correlation of each attention map, of two sessions
    (int8 and float32) on the same batches."""
    cosines, correlations = [], []
    for batch in batches:
        e32, a32 = fp32.run(["embedding", "attention"], {input_name: batch})
        e8, a8 = int8.run(["embedding", "attention"], {input_name: batch})
        cosines.append(np.sum(e32 * e8, axis=1) / (np.linalg.norm(e32, axis=1) * np.linalg.norm(e8, axis=1)))
        x, y = (a.reshape(-1, a.shape[-1]) for a in (a32, a8))  # one row per image and head
        x, y = x - x.mean(axis=1, keepdims=True), y - y.mean(axis=1, keepdims=True)
        correlations.append(np.sum(x * y, axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12))
    cos, corr = np.concatenate(cosines), np.concatenate(correlations)
    return {
        "images": int(cos.size),
        "embedding_cosine_mean": round(float(cos.mean()), 5),
        "embedding_cosine_min": round(float(cos.min()), 5),
        "attention_correlation_mean": round(float(corr.mean()), 5),
        "attention_correlation_min": round(float(corr.min()), 5),
    }


def _knn_drop(fp32_path: Path, int8_path: Path, metadata: ModelMetadata, options: Int8Options) -> dict[str, Any] | None:
    """k-NN top-1 of both files on the same labelled folders, and the drop in points."""
    if options.knn_train is None or options.knn_val is None:
        return None
    transform = eval_transform(metadata["image_size"], metadata["resize_size"], metadata["mean"], metadata["std"])
    gallery, classes = labelled_folder(options.knn_train, transform, options.knn_max_images)
    queries, query_classes = labelled_folder(options.knn_val, transform, options.knn_max_images)
    if classes != query_classes:
        raise ExportError(f"class folders differ between {options.knn_train} and {options.knn_val}")
    cpu = torch.device("cpu")
    results: dict[str, Any] = {}
    for key, path in (("fp32", fp32_path), ("int8", int8_path)):
        model = OnnxFeatures(path, metadata["input_name"])
        start = time.perf_counter()
        train_f, train_y = extract_features(model, gallery, cpu, BATCH, num_workers=0, desc=f"k-NN gallery ({key})")
        val_f, val_y = extract_features(model, queries, cpu, BATCH, num_workers=0, desc=f"k-NN queries ({key})")
        results[key] = dict(weighted_knn(train_f, train_y, val_f, val_y, len(classes)))
        log.info("k-NN %s: top-1 %.2f%% (%.0f s)", key, results[key]["top1"], time.perf_counter() - start)
    return {
        "train": str(options.knn_train),
        "val": str(options.knn_val),
        "k": DEFAULT_K,
        "temperature": DEFAULT_TEMPERATURE,
        "fp32_top1": results["fp32"]["top1"],
        "int8_top1": results["int8"]["top1"],
        "fp32_top5": results["fp32"]["top5"],
        "int8_top5": results["int8"]["top5"],
        "n_train": results["fp32"]["n_train"],
        "n_val": results["fp32"]["n_val"],
        "drop_points": round(results["fp32"]["top1"] - results["int8"]["top1"], 2),
    }


def add_int8_model(output_dir: Path, metadata: ModelMetadata, options: Int8Options) -> dict[str, Any]:
    """Quantise ``output_dir/model.onnx`` into ``model_int8.onnx`` and measure the drop.

    Returns the ``int8`` record of model.json (the caller writes model.json last).
    """
    fp32_path = output_dir / metadata["file"]
    target = output_dir / INT8_FILE
    log.info("quantising %s to int8 (%s) ...", fp32_path, options.method)
    batches = calibration_batches(metadata, options.calibration, options.max_images)
    record = quantize_file(fp32_path, target, options.method, metadata["input_name"], batches)
    fp32, int8 = cpu_session(fp32_path), cpu_session(target)
    measured: dict[str, Any] = {"agreement": agreement_with_fp32(fp32, int8, metadata["input_name"], batches)}
    knn = _knn_drop(fp32_path, target, metadata, options)
    if knn is not None:
        measured["knn"] = knn
    record.update(
        {
            "file": INT8_FILE,
            "sha256": sha256_file(target),
            "bytes": target.stat().st_size,
            "calibration": {"folder": str(options.calibration), "images": sum(len(b) for b in batches)},
            "measured": measured,
            "knn_drop_points": None if knn is None else knn["drop_points"],
        }
    )
    agreement = measured["agreement"]
    log.info(
        "%s: %.1f MB, embedding cosine mean %.4f (min %.4f), attention correlation %.4f%s",
        target,
        record["bytes"] / 1e6,
        agreement["embedding_cosine_mean"],
        agreement["embedding_cosine_min"],
        agreement["attention_correlation_mean"],
        "" if knn is None else f", k-NN top-1 {knn['fp32_top1']:.2f}% -> {knn['int8_top1']:.2f}%",
    )
    return record
