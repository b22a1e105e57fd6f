"""Export a DINO teacher backbone to an ONNX model folder (``dino export``).

A model folder (``models/NAME``) is what the service serves. It holds

- ``model.onnx``: input ``image`` float32 [B, 3, H, W] (normalised); three outputs computed by one
  forward pass: ``embedding`` [B, D] (the [CLS] token after the final LayerNorm, the feature DINO uses
  for k-NN), ``patch_tokens`` [B, N, D] (the normalised patch tokens) and ``attention`` [B, heads, N]
  (the last block's softmax attention of the [CLS] query over the N patch tokens, one map per head).
- ``model_fp16.onnx`` (with ``--fp16``): the same graph computing in float16, for GPU serving. Its
  input and outputs stay float32 (casts are inside the graph), so both files are interchangeable.
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

import argparse
import contextlib
import copy
import datetime as dt
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from service.model_folder import FORMAT_VERSION, METADATA_FILE, OUTPUT_NAMES, sha256_file
from training.augmentation import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
FP16_FILE = "model_fp16.onnx"
INPUT_NAME = "image"
#: opset 18 is the first whose Resize has ``antialias``, which timm's position-embedding resampling uses
DEFAULT_OPSET = 18
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


class ExportError(Exception):
    """A user-facing export failure (bad checkpoint, unsupported model, verification failure)."""


# --------------------------------------------------------------------------------------------------
# The exported graph
# --------------------------------------------------------------------------------------------------


def cls_attention(block: nn.Module, x: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Softmax attention weights of the [CLS] query over the patch tokens in ``block`` for input ``x``.

    timm's ``Attention`` uses fused scaled-dot-product attention, which never materialises the
    weights, so they are recomputed from the block's own ``qkv`` projection (with its q/k norms and
    scale). Only the [CLS] query row is computed: O(N) instead of O(N^2) extra work.

    Returns [B, heads, N] where N excludes the prefix ([CLS], register) tokens.
    """
    attn = block.attn
    h = block.norm1(x)
    batch, tokens, _ = h.shape
    qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # [B, heads, 1, tokens]
    return logits.softmax(dim=-1)[:, :, 0, num_prefix_tokens:]


class DinoExportModule(nn.Module):
    """Wraps a timm ``VisionTransformer`` so that one forward pass yields (embedding, patch_tokens, attention).

    The computation is timm's ``forward_features`` + token pooling, with the last block's [CLS]
    attention weights recomputed alongside (see :func:`cls_attention`).
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        _check_supported(vit)
        self.vit = vit

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vit = self.vit
        x = vit.patch_embed(image)
        x = vit._pos_embed(x)  # resamples the position embeddings to the input's grid
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        for block in vit.blocks[:-1]:
            x = block(x)
        last = vit.blocks[-1]
        attention = cls_attention(last, x, vit.num_prefix_tokens)
        x = vit.norm(last(x))
        return x[:, 0], x[:, vit.num_prefix_tokens :], attention


@torch.no_grad()
def reference_outputs(backbone: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three outputs computed in PyTorch eager mode, independently of :class:`DinoExportModule`.

    For parity checks of exported models: the embedding is ``backbone(images)``, the patch tokens come
    from ``forward_features`` and the attention is captured from timm's own unfused attention path
    (the softmax weights entering ``attn_drop`` of the last block), not recomputed.
    """
    vit = copy.deepcopy(backbone).float().cpu().eval()
    attn = vit.blocks[-1].attn
    attn.fused_attn = False  # the unfused path materialises the softmax weights
    captured: list[torch.Tensor] = []
    hook = attn.attn_drop.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        images = images.float().cpu()
        embedding = vit(images)
        captured.clear()  # keep only the weights of the forward_features pass below
        tokens = vit.forward_features(images)
    finally:
        hook.remove()
    if len(captured) != 1:
        raise ExportError("could not capture the last block's attention weights from timm's Attention")
    prefix = vit.num_prefix_tokens
    return {"embedding": embedding, "patch_tokens": tokens[:, prefix:], "attention": captured[0][:, :, 0, prefix:]}


class Float16Module(nn.Module):
    """Runs a module in float16 behind a float32 interface (the casts become part of the ONNX graph)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.half()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.module(image.half())
        return tuple(o.float() for o in outputs)


def _check_supported(vit: nn.Module) -> None:
    """Fail early, with a clear message, on backbones the wrapper cannot export."""
    needed = ("patch_embed", "_pos_embed", "blocks", "norm", "num_prefix_tokens")
    missing = [name for name in needed if not hasattr(vit, name)]
    if missing:
        raise ExportError(f"expected a timm VisionTransformer; {type(vit).__name__} lacks {', '.join(missing)}")
    if getattr(vit, "global_pool", "token") != "token":
        raise ExportError(f"the embedding must be the [CLS] token; backbone pools with {vit.global_pool!r}")
    attn = vit.blocks[-1].attn
    if not all(hasattr(attn, name) for name in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")):
        raise ExportError(f"unsupported attention module {type(attn).__name__} in the last block")


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def default_resize_size(image_size: int) -> int:
    """The DINO evaluation resize (shorter side) for a centre crop of ``image_size``: 256 for 224."""
    return round(image_size * RESIZE_RATIO)


def _export_onnx(module: nn.Module, path: Path, example: torch.Tensor, patch_size: int, dynamic_hw: bool, opset: int) -> None:
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
        for dim, wanted in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
            if isinstance(wanted, str):
                dim.dim_param = wanted
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _onnx_output_shapes(embed_dim: int, num_heads: int, num_patches: int | str) -> list[dict]:
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
        for name, result, ref in zip(OUTPUT_NAMES, results, reference)
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
    opset: int = DEFAULT_OPSET,
) -> dict:
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
        opset: ONNX opset, >= 18.

    Returns:
        The model.json content.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: the antialiased Resize of the position embeddings needs >= {MIN_OPSET}")
    if image_size % patch_size:
        raise ExportError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
    resize_size = resize_size or default_resize_size(image_size)
    if resize_size < image_size:
        raise ExportError(f"resize size {resize_size} is smaller than the crop size {image_size}")
    output_dir = Path(output_dir)

    vit = copy.deepcopy(backbone).float().cpu().eval()
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

    generator = torch.Generator().manual_seed(EXAMPLE_SEED)
    example = torch.randn(TRACE_BATCH, 3, image_size, image_size, generator=generator)

    files: dict[str, Any] = {}
    report: dict[str, Any] = {"exporter": "torch.onnx.export(dynamo=True)"}
    variants = [(MODEL_FILE, module, VERIFY_ATOL)]
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
                raise ExportError(f"{filename}: ONNX Runtime disagrees with PyTorch (max abs diff {diffs}, tolerance {atol})")
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

    metadata: dict[str, Any] = {
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
        "input_shape": [DIM_BATCH, 3, DIM_HEIGHT if dynamic_hw else image_size, DIM_WIDTH if dynamic_hw else image_size],
        "outputs": _onnx_output_shapes(embed_dim, num_heads, num_patches),
        "attention_normalisation": ATTENTION_NOTE,
        "dynamic_hw": dynamic_hw,
        "opset": int(opset),
        "file": MODEL_FILE,
        "sha256": files[MODEL_FILE]["sha256"],
    }
    if fp16:
        metadata["fp16_file"] = FP16_FILE
        metadata["fp16_sha256"] = files[FP16_FILE]["sha256"]
    metadata["provenance"] = {
        **(provenance or {}),
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "onnx_version": onnx.__version__,
    }
    metadata["export"] = report
    tmp_json = output_dir / f".{METADATA_FILE}.tmp"
    tmp_json.write_text(json.dumps(metadata, indent=2) + "\n")
    os.replace(tmp_json, output_dir / METADATA_FILE)
    return metadata


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _safe_globals() -> list:
    """Types that are harmless to unpickle and occur in checkpoints: argparse args (official DINO
    checkpoints), NumPy arrays and scalars (RNG states, metrics)."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    dtypes = [getattr(np.dtypes, n) for n in getattr(np.dtypes, "__all__", [])]
    return [argparse.Namespace, np.ndarray, np.dtype, _reconstruct, scalar, *dtypes]


def load_torch_file(path: str | Path) -> Any:
    """``torch.load`` onto the CPU without executing arbitrary pickled code.

    Only tensors, plain containers and the types of :func:`_safe_globals` are accepted; anything else
    is refused with a clear error rather than unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError for corrupt/non-torch files, ...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path}: cannot load as a torch file: {first_line}") from exc


def strip_prefixes(state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove any leading sequence of ``prefixes`` (e.g. ``module.``, ``_orig_mod.``) from every key."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


#: wrappers that may prefix the keys of a saved module: DistributedDataParallel and torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
BACKBONE_PREFIX = "backbone."
#: ``provenance.source_format`` of models exported from this project's checkpoints
CHECKPOINT_FORMAT = "dino-platform checkpoint (teacher)"


def backbone_state_dict(wrapper_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``backbone.`` entries of a MultiCropWrapper state dict, prefix removed (head entries dropped)."""
    state = strip_prefixes(wrapper_state, WRAPPER_PREFIXES)
    return {k[len(BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}


def load_checkpoint_teacher(path: str | Path) -> tuple[nn.Module, dict, dict]:
    """Load the teacher backbone of a ``dino train`` checkpoint.

    Returns:
        (backbone in eval mode, training config dict, meta) where meta has ``source``,
        ``source_sha256``, ``epoch``, ``step`` and ``knn`` (None when unknown).
    """
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, dict) or "teacher" not in checkpoint or "config" not in checkpoint:
        keys = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ExportError(f"{path}: not a 'dino train' checkpoint (expected 'teacher' and 'config' entries, found {keys})")
    config = dict(checkpoint["config"])
    try:
        arch, patch_size, image_size = config["arch"], int(config["patch_size"]), int(config["global_size"])
    except KeyError as exc:
        raise ExportError(f"{path}: the checkpoint's config lacks {exc}") from exc
    from training.import_weights import backbone_from_state  # import_weights builds on this module

    backbone = backbone_from_state(arch, patch_size, image_size, backbone_state_dict(checkpoint["teacher"]), f"{arch}/{patch_size} ({path})")
    meta = {
        "source": str(Path(path).resolve()),
        "source_format": CHECKPOINT_FORMAT,
        "source_sha256": sha256_file(path),
        "epoch": checkpoint.get("epoch"),
        "step": checkpoint.get("step"),
        "knn": checkpoint.get("knn"),
    }
    return backbone, config, meta


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def add_export_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``dino export`` and ``dino import``."""
    parser.add_argument("--output", required=True, help="model folder to write, e.g. models/NAME")
    parser.add_argument("--name", default=None, help="model name (default: the output folder's name)")
    parser.add_argument("--resize-size", type=int, default=None, help="shorter-side resize before the centre crop (default: image size * 8/7)")
    parser.add_argument("--fp16", action="store_true", help=f"also write {FP16_FILE} (float16 compute) for GPU serving")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET}, minimum {MIN_OPSET})")


def export_with_options(backbone: nn.Module, args: argparse.Namespace, *, arch: str, patch_size: int,
                        image_size: int, provenance: dict) -> dict:
    """:func:`export_backbone` into ``args.output`` with the options of :func:`add_export_options`."""
    output = Path(args.output)
    return export_backbone(
        backbone,
        output,
        name=args.name or output.name,
        arch=arch,
        patch_size=patch_size,
        image_size=image_size,
        resize_size=args.resize_size,
        provenance=provenance,
        fp16=args.fp16,
        opset=args.opset,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by 'dino train' (RUN/checkpoint.pth)")
    parser.add_argument("--image-size", type=int, default=None, help="native resolution (default: the run's global crop size)")
    parser.add_argument("--knn-result", default=None, help="JSON written by 'dino knn --checkpoint' for this checkpoint, recorded in model.json")
    add_export_options(parser)


def print_summary(metadata: dict, output_dir: Path) -> None:
    """What ``dino export``/``dino import`` print: files, sizes, checker, export time, parity."""
    print(f"wrote {output_dir}/  ({metadata['arch']}/{metadata['patch_size']}, {metadata['image_size']} px, dynamic H/W: {metadata['dynamic_hw']})")
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
        raise ExportError(f"--knn-result {path}: evaluates epoch {result['epoch']}, but the checkpoint is at epoch {meta.get('epoch')}")
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
    except ExportError as exc:
        print(f"dino export: {exc}", file=sys.stderr)
        return 1
    print_summary(metadata, output)
    return 0
