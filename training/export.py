"""Turn a timm ViT backbone into an ONNX model folder: :func:`export_backbone`.

The graph itself is :mod:`training.export_graph`; the ``dino export`` and ``dino import`` commands
are :mod:`training.export_cli` and :mod:`training.import_weights`.

A model folder (``models/NAME``) is what the service serves. It holds

- ``model.onnx``: input ``image`` float32 [B, 3, H, W] (normalised); three outputs computed by one
  forward pass: ``embedding`` [B, D] (the [CLS] token after the final LayerNorm, the feature DINO uses
  for k-NN), ``patch_tokens`` [B, N, D] (the normalised patch tokens) and ``attention`` [B, heads, N]
  (the last block's softmax attention of the [CLS] query over the N patch tokens, one map per head).
- ``model_fp16.onnx`` (with ``--fp16``): the same graph computing in float16, for GPU serving. Its
  input and outputs stay float32 (casts are inside the graph), so both files are interchangeable.
- ``model_int8.onnx`` (with ``--int8``): int8 weights for the CPU, with the measured drop in model.json
  (:mod:`training.quantize`). Same interface again.
- ``model.json``: everything a client needs to preprocess images and interpret the outputs, checksums
  and the provenance of the weights.

The attention output is ``softmax(q_cls k^T / sqrt(d))`` over all N + 1 tokens with the [CLS] column
dropped afterwards, *not* renormalised: each head's N values sum to ``1 - attn(cls -> cls)``. This is
what the DINO paper visualises.

Batch, height and width are dynamic (H and W multiples of the patch size): the position embeddings
are resampled inside the graph with a size-based antialiased bicubic ``Resize`` (ONNX opset 18),
which is exactly what timm's ``dynamic_img_size`` does in PyTorch, so ONNX Runtime matches PyTorch at
any resolution. The graph is produced by the torch.export-based ("dynamo") ONNX exporter: the legacy
TorchScript exporter specialises timm's resampling branch to the example size.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import io
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from dino.model_folder import FORMAT_VERSION, METADATA_FILE, OUTPUT_NAMES, ModelMetadata, OutputSpec, sha256_file
from training.augmentation import IMAGENET_MEAN, IMAGENET_STD
from training.export_graph import DinoExportModule, ExportError, Float16Module
from training.quantize import INT8_FILE, Int8Options, add_int8_model

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
FP16_FILE = "model_fp16.onnx"
INPUT_NAME = "image"
#: opset 20 has a native ``Gelu`` op: ONNX Runtime runs it as one kernel, where opset 18's erf
#: expansion stays five unfused nodes (1-7% faster in float32, 7-18% in int8: ``benchmarks/precision.py``)
DEFAULT_OPSET = 20
#: opset 18 is the first whose Resize has ``antialias``, which timm's position-embedding resampling uses
MIN_OPSET = 18
#: example batch used for tracing; > 1 so that the exporter does not specialise the batch axis to 1
TRACE_BATCH = 2
EXAMPLE_SEED = 0  #: seed of the random example input (tracing and the post-export check)
#: upper bound of the patch grid side declared to torch.export (4096 px at patch 16); ONNX keeps no bound
MAX_GRID_SIDE = 256
MAX_BATCH = 65536
#: resize ratio of the DINO evaluation transform (256 -> 224)
RESIZE_RATIO = 8 / 7
#: tolerance of the self-check run after export (fp32 ONNX Runtime vs PyTorch on random input)
VERIFY_ATOL = 1e-4
VERIFY_ATOL_FP16 = 5e-2
#: symbolic dimension names of model.json and of the ONNX graph's inputs and outputs
DIM_BATCH, DIM_HEIGHT, DIM_WIDTH, DIM_PATCHES = "batch", "height", "width", "num_patches"
ATTENTION_NOTE = (
    "softmax over [CLS] + patch tokens of the last block's [CLS] query, per head; the [CLS] column is "
    "dropped and the N values are not renormalised"
)


def default_resize_size(image_size: int) -> int:
    """The DINO evaluation resize (shorter side) for a centre crop of ``image_size``: 256 for 224."""
    return round(image_size * RESIZE_RATIO)


def _export_onnx(
    module: nn.Module, path: Path, example: torch.Tensor, patch_size: int, dynamic_hw: bool, opset: int
) -> None:
    """torch.export-based ONNX export of ``module`` with a dynamic batch (and H, W) axis."""
    batch = torch.export.Dim(DIM_BATCH, min=1, max=MAX_BATCH)
    axes: dict[int, Any] = {0: batch}
    if dynamic_hw:
        axes[2] = patch_size * torch.export.Dim("grid_h", min=1, max=MAX_GRID_SIDE)
        axes[3] = patch_size * torch.export.Dim("grid_w", min=1, max=MAX_GRID_SIDE)
    chatter = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")  # exporter chatter about deprecated internals, not about this model
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={INPUT_NAME: axes},
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    log.debug("torch.onnx: %s", chatter.getvalue().strip())


def _name_dims(path: Path, embed_dim: int, num_heads: int, dynamic_hw: bool) -> None:
    """Give the graph's inputs and outputs the readable symbolic dims of model.json, then run the checker.

    The exporter names derived dims after internal symbols (e.g. ``s39*s94``); intermediate shape
    annotations that use them are dropped too (ONNX Runtime re-infers them).
    """
    import onnx

    model = onnx.load(str(path))
    spatial = (DIM_HEIGHT, DIM_WIDTH) if dynamic_hw else (None, None)
    shapes = {
        INPUT_NAME: (DIM_BATCH, 3, *spatial),
        "embedding": (DIM_BATCH, embed_dim),
        "patch_tokens": (DIM_BATCH, DIM_PATCHES if dynamic_hw else None, embed_dim),
        "attention": (DIM_BATCH, num_heads, DIM_PATCHES if dynamic_hw else None),
    }
    for value in list(model.graph.input) + list(model.graph.output):
        for dim, wanted in zip(value.type.tensor_type.shape.dim, shapes[value.name], strict=True):
            if isinstance(wanted, str):
                dim.dim_param = wanted
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _onnx_output_shapes(embed_dim: int, num_heads: int, num_patches: int | str) -> list[OutputSpec]:
    return [
        {"name": "embedding", "shape": [DIM_BATCH, embed_dim]},
        {"name": "patch_tokens", "shape": [DIM_BATCH, num_patches, embed_dim]},
        {"name": "attention", "shape": [DIM_BATCH, num_heads, num_patches]},
    ]


def verify_onnx(path: str | Path, module: nn.Module, example: torch.Tensor) -> dict[str, float] | None:
    """Max abs difference per output between ONNX Runtime (CPU) and ``module`` on ``example``.

    Returns None when onnxruntime is not installed (it belongs to the 'serve' extra) or when the CPU
    provider has no kernels for the graph (float16 models are meant for the GPU).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime not installed: skipping the post-export check")
        return None
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        results = session.run(list(OUTPUT_NAMES), {INPUT_NAME: example.numpy()})
    except Exception as exc:  # ORT raises its own exception types (e.g. NOT_IMPLEMENTED for fp16 kernels)
        log.warning("ONNX Runtime CPU cannot run %s (%s): skipping the post-export check", path, exc)
        return None
    with torch.no_grad():
        reference = module(example)
    return {
        name: float(np.abs(result - ref.float().numpy()).max())
        for name, result, ref in zip(OUTPUT_NAMES, results, reference, strict=True)
    }


def export_backbone(
    backbone: nn.Module,
    output_dir: str | Path,
    *,
    name: str,
    arch: str,
    patch_size: int,
    image_size: int,
    resize_size: int | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    provenance: dict | None = None,
    fp16: bool = False,
    int8: Int8Options | None = None,
    opset: int = DEFAULT_OPSET,
) -> ModelMetadata:
    """Export a timm ViT backbone to ``output_dir`` (model.onnx, model.json, optionally model_fp16.onnx).

    The backbone is copied (left untouched), moved to the CPU in float32 and eval mode. After export
    the graph passes ``onnx.checker`` and, when onnxruntime is installed, is compared against
    PyTorch on a random input (fails above ``VERIFY_ATOL``). ``model.json`` is written last, so a
    folder with a model.json is complete.

    Args:
        backbone: a timm ``VisionTransformer`` (e.g. from :func:`training.backbone.build_backbone`).
            Height and width are dynamic when it was built with ``dynamic_img_size=True``.
        output_dir: the model folder (created).
        name, arch, patch_size: recorded in model.json (the architecture is read off the module).
        image_size: the native resolution (side of the centre crop) clients should use.
        resize_size: shorter-side resize before the crop; defaults to ``image_size * 8/7``.
        mean, std: normalisation of the input.
        provenance: where the weights come from (source file, sha256, training config, epoch, k-NN).
        fp16: also write ``model_fp16.onnx`` (float16 compute, float32 interface).
        int8: also write ``model_int8.onnx`` and measure its drop (:func:`training.quantize.add_int8_model`).
        opset: ONNX opset, >= 18.

    Returns:
        The model.json content.
    """
    if opset < MIN_OPSET:
        raise ExportError(
            f"opset {opset} is too old: the antialiased Resize of the position embeddings needs >= {MIN_OPSET}"
        )
    if int8 is not None:
        int8.check()
    if image_size % patch_size:
        raise ExportError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
    resize_size = resize_size or default_resize_size(image_size)
    if resize_size < image_size:
        raise ExportError(f"resize size {resize_size} is smaller than the crop size {image_size}")
    output_dir = Path(output_dir)

    vit: Any = copy.deepcopy(backbone).float().cpu().eval()  # a timm VisionTransformer
    module = DinoExportModule(vit).eval()
    dynamic_hw = bool(getattr(vit, "dynamic_img_size", False))
    grid_patch = tuple(getattr(vit.patch_embed, "patch_size", (patch_size, patch_size)))
    if grid_patch != (patch_size, patch_size):
        raise ExportError(f"patch size {patch_size} does not match the backbone's {grid_patch}")
    embed_dim = int(vit.embed_dim)
    num_heads = int(vit.blocks[-1].attn.num_heads)
    native_patches = (image_size // patch_size) ** 2
    num_patches: int | str = DIM_PATCHES if dynamic_hw else native_patches
    if not dynamic_hw:
        expected = tuple(getattr(vit.patch_embed, "img_size", (image_size, image_size)))
        if expected != (image_size, image_size):
            raise ExportError(f"backbone has a fixed input size {expected}, but image size {image_size} was asked")

    output_dir.mkdir(parents=True, exist_ok=True)
    # re-exporting over a folder: drop its model.json first, so that the folder reads as incomplete
    # until the new one is written, and a float16 file that the new model.json would not describe
    (output_dir / METADATA_FILE).unlink(missing_ok=True)
    if not fp16:
        (output_dir / FP16_FILE).unlink(missing_ok=True)
    if int8 is None:
        (output_dir / INT8_FILE).unlink(missing_ok=True)

    generator = torch.Generator().manual_seed(EXAMPLE_SEED)
    example = torch.randn(TRACE_BATCH, 3, image_size, image_size, generator=generator)

    files: dict[str, Any] = {}
    report: dict[str, Any] = {"exporter": "torch.onnx.export(dynamo=True)"}
    variants: list[tuple[str, nn.Module, float]] = [(MODEL_FILE, module, VERIFY_ATOL)]
    if fp16:
        variants.append((FP16_FILE, Float16Module(copy.deepcopy(module)).eval(), VERIFY_ATOL_FP16))
    for filename, variant, atol in variants:
        final = output_dir / filename
        with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
            tmp_path = Path(tmp) / filename
            start = time.perf_counter()
            log.info("exporting %s ...", final)
            _export_onnx(variant, tmp_path, example, patch_size, dynamic_hw, opset)
            _name_dims(tmp_path, embed_dim, num_heads, dynamic_hw)  # includes onnx.checker
            seconds = time.perf_counter() - start
            diffs = verify_onnx(tmp_path, variant, example)
            if diffs is not None and max(diffs.values()) > atol:
                raise ExportError(
                    f"{filename}: ONNX Runtime disagrees with PyTorch (max abs diff {diffs}, tolerance {atol})"
                )
            os.replace(tmp_path, final)
        files[filename] = {"sha256": sha256_file(final), "bytes": final.stat().st_size}
        report[filename] = {
            "export_seconds": round(seconds, 2),
            "file_bytes": files[filename]["bytes"],
            "onnx_checker": "passed",
            "ort_cpu_max_abs_diff": diffs,
        }
        log.info("%s: %.1f MB, exported and checked in %.1f s", final, files[filename]["bytes"] / 1e6, seconds)

    import onnx
    import timm

    metadata: ModelMetadata = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "arch": arch,
        "patch_size": int(patch_size),
        "embed_dim": embed_dim,
        "num_heads": num_heads,
        "image_size": int(image_size),
        "resize_size": int(resize_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "input_name": INPUT_NAME,
        "input_shape": [
            DIM_BATCH,
            3,
            DIM_HEIGHT if dynamic_hw else image_size,
            DIM_WIDTH if dynamic_hw else image_size,
        ],
        "outputs": _onnx_output_shapes(embed_dim, num_heads, num_patches),
        "attention_normalisation": ATTENTION_NOTE,
        "dynamic_hw": dynamic_hw,
        "opset": int(opset),
        "file": MODEL_FILE,
        "sha256": files[MODEL_FILE]["sha256"],
        "provenance": {
            **(provenance or {}),
            "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
            "timm_version": timm.__version__,
            "onnx_version": onnx.__version__,
        },
        "export": report,
    }
    if fp16:
        metadata["fp16_file"] = FP16_FILE
        metadata["fp16_sha256"] = files[FP16_FILE]["sha256"]
    if int8 is not None:
        record = add_int8_model(output_dir, metadata, int8)
        metadata["int8_file"] = INT8_FILE
        metadata["int8_sha256"] = record["sha256"]
        metadata["int8"] = record
    tmp_json = output_dir / f".{METADATA_FILE}.tmp"
    tmp_json.write_text(json.dumps(metadata, indent=2) + "\n")
    os.replace(tmp_json, output_dir / METADATA_FILE)
    return metadata
