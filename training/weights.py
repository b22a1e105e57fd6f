"""Loading ViT weights into timm backbones, safely: the one home of weight loading.

- :func:`load_torch_file`: ``torch.load`` with ``weights_only=True`` and a short allow-list, so that
  no code in a downloaded or shared file is executed;
- :func:`strip_prefixes`, :func:`backbone_state_dict`: the key names of DDP, ``torch.compile`` and
  the DINO multi-crop wrapper, removed;
- :func:`fit_state_dict`, :func:`backbone_from_state`: a state dict checked against an architecture
  (every missing, unexpected and mismatched key reported at once) and assigned to it;
- :func:`load_checkpoint_teacher`: the teacher backbone of a ``dino train`` checkpoint;
- :func:`read_weights`, :func:`load_backbone_weights`: any of the accepted files below.

Accepted files (the layout is detected from the content, not the file name):

- official DINO "backbone only" releases: a bare state dict with timm's ViT key names
  (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,
  mlp.fc1,mlp.fc2}.*``, ``norm.*``); the official DINO ViT uses the same names as timm;
- official DINO "full checkpoints": ``{"teacher": ..., "student": ..., "args": Namespace, ...}`` whose
  keys are prefixed ``backbone.`` or ``module.backbone.`` and include ``head.*``: the teacher's
  backbone is used, the DINO head dropped;
- timm ViT state dicts as ``.pth``, ``.bin`` or ``.safetensors`` (a classifier ``head.*`` is dropped;
  ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers are unwrapped);
- this project's ``dino train`` checkpoints (teacher backbone, with the run's provenance).

The weights must fit the named architecture exactly. The one conversion applied is resampling the
position embeddings (bicubic, as timm does) when the file was trained at another resolution.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from dino.model_folder import sha256_file
from training.backbone import build_backbone, check_backbone_args


class WeightsError(Exception):
    """Weights that cannot be loaded: unreadable file, unknown layout, or keys/shapes that do not fit."""


class UnreadableWeightsError(WeightsError):
    """A file that cannot be read at all (truncated, corrupt, not a torch/safetensors file), as opposed
    to a readable file whose weights do not fit: a downloaded file in this state is discarded."""


def _safe_globals() -> list:
    """Types that are harmless to unpickle and occur in checkpoints: argparse args (official DINO
    checkpoints), NumPy arrays and scalars (RNG states, metrics)."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # NumPy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    _reconstruct, scalar = multiarray._reconstruct, multiarray.scalar
    dtypes = [getattr(np.dtypes, n) for n in getattr(np.dtypes, "__all__", [])]
    return [argparse.Namespace, np.ndarray, np.dtype, _reconstruct, scalar, *dtypes]


def load_torch_file(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` onto the CPU without executing arbitrary pickled code.

    Only tensors, plain containers and the types of :func:`_safe_globals` are accepted; anything else
    is refused with a clear error rather than unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError for corrupt/non-torch files, ...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnreadableWeightsError(f"{path}: cannot load as a torch file: {first_line}") from exc


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
        raise WeightsError(
            f"{path}: not a 'dino train' checkpoint (expected 'teacher' and 'config' entries, found {keys})"
        )
    config = dict(checkpoint["config"])
    try:
        arch, patch_size, image_size = config["arch"], int(config["patch_size"]), int(config["global_size"])
    except KeyError as exc:
        raise WeightsError(f"{path}: the checkpoint's config lacks {exc}") from exc
    backbone = backbone_from_state(
        arch, patch_size, image_size, backbone_state_dict(checkpoint["teacher"]), f"{arch}/{patch_size} ({path})"
    )
    meta = {
        "source": str(Path(path).resolve()),
        "source_format": CHECKPOINT_FORMAT,
        "source_sha256": sha256_file(path),
        "epoch": checkpoint.get("epoch"),
        "step": checkpoint.get("step"),
        "knn": checkpoint.get("knn"),
    }
    return backbone, config, meta


DEFAULT_IMAGE_SIZE = 224
#: heads that are not part of the backbone: DINO's projection head, timm's classifier
HEAD_PREFIX = "head."
#: keys listed per category in an error message before summarising the rest
MAX_LISTED_KEYS = 20
#: keys under which training scripts (timm, DeiT) wrap the model's state dict
STATE_DICT_WRAPPERS = ("state_dict", "model", "module")
POS_EMBED_KEY = "pos_embed"

FORMAT_OFFICIAL_BACKBONE = "official DINO backbone / timm state dict"
FORMAT_OFFICIAL_FULL = "official DINO full checkpoint (teacher)"
FORMAT_PROJECT = CHECKPOINT_FORMAT
FORMAT_SAFETENSORS = "safetensors state dict"


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _drop_heads(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str, dict]:
    """Read a weights file and return (backbone state dict with timm key names, format, extra provenance)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            raise WeightsError(f"{path}: no such file")
        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise UnreadableWeightsError(f"{path}: cannot read as safetensors: {exc}") from exc
        return _drop_heads(strip_prefixes(tensors, WRAPPER_PREFIXES)), FORMAT_SAFETENSORS, {}

    loaded = load_torch_file(path)
    if not isinstance(loaded, dict):
        raise WeightsError(f"{path}: expected a dict (a state dict or a checkpoint), found {type(loaded).__name__}")
    obj: dict[str, Any] = loaded

    if "teacher" in obj and "config" in obj and "epoch" in obj:
        config = dict(obj["config"])
        extra = {"training_config": config, "epoch": obj.get("epoch"), "step": obj.get("step"), "knn": obj.get("knn")}
        return backbone_state_dict(obj["teacher"]), FORMAT_PROJECT, extra

    if "teacher" in obj:
        teacher = obj["teacher"]
        if not _is_state_dict(teacher):
            raise WeightsError(f"{path}: the 'teacher' entry is not a state dict")
        state = backbone_state_dict(teacher)
        if not state:
            sample = ", ".join(list(teacher)[:5])
            raise WeightsError(f"{path}: no '{BACKBONE_PREFIX}' keys in the teacher state dict (found {sample}, ...)")
        extra = {"epoch": obj.get("epoch")}
        if isinstance(obj.get("args"), argparse.Namespace):
            extra["training_args"] = {
                k: v for k, v in vars(obj["args"]).items() if isinstance(v, (int, float, str, bool, type(None)))
            }
        return state, FORMAT_OFFICIAL_FULL, extra

    for wrapper in STATE_DICT_WRAPPERS:
        if wrapper in obj and _is_state_dict(obj[wrapper]):
            obj = obj[wrapper]
            break
    if not _is_state_dict(obj):
        non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:MAX_LISTED_KEYS]
        raise WeightsError(
            f"{path}: unrecognised layout: not a state dict (non-tensor entries: {', '.join(map(str, non_tensors))}) "
            "and no 'teacher' entry"
        )
    state = strip_prefixes(obj, WRAPPER_PREFIXES)
    if all(k.startswith(BACKBONE_PREFIX) or k.startswith(HEAD_PREFIX) for k in state):
        state = {k[len(BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    return _drop_heads(state), FORMAT_OFFICIAL_BACKBONE, {}


def _listing(title: str, items: list[str]) -> str:
    shown = items[:MAX_LISTED_KEYS]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {item}" for item in shown) + more


def fit_state_dict(backbone: nn.Module, state: dict[str, torch.Tensor], describe: str) -> dict[str, torch.Tensor]:
    """Check ``state`` against ``backbone`` and return it ready for a strict ``load_state_dict``.

    Position embeddings of another square grid (weights trained at another resolution) are resampled
    bicubically to the backbone's grid. Every other difference is an :class:`WeightsError` that
    lists all missing keys, unexpected keys and shape mismatches at once.
    """
    expected = backbone.state_dict()
    state = dict(state)
    pos = state.get(POS_EMBED_KEY)
    target = expected.get(POS_EMBED_KEY)
    if (
        pos is not None
        and target is not None
        and pos.ndim == 3
        and pos.shape[-1] == target.shape[-1]
        and pos.shape != target.shape
    ):
        vit: Any = backbone  # a timm VisionTransformer
        prefix = int(vit.num_prefix_tokens)
        old_side = round((pos.shape[1] - prefix) ** 0.5)
        if old_side * old_side + prefix == pos.shape[1]:
            state[POS_EMBED_KEY] = resample_abs_pos_embed(
                pos.float(), new_size=list(vit.patch_embed.grid_size), num_prefix_tokens=prefix
            ).to(pos.dtype)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"the weights do not fit {describe}:"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatches", mismatched))
        raise WeightsError("\n".join(parts))
    # contiguous copies: the module must not share storage with the caller's (or the file's) tensors
    return {k: v.to(expected[k].dtype).clone(memory_format=torch.contiguous_format) for k, v in state.items()}


def backbone_from_state(
    arch: str, patch_size: int, image_size: int, state: dict[str, torch.Tensor], describe: str
) -> nn.Module:
    """Build ``arch``/``patch_size`` at ``image_size`` holding exactly the weights of ``state`` (eval mode).

    The module is created on the meta device and the checked tensors are assigned to it, which skips
    the random initialisation (seconds for ViT-B) that the weights would overwrite anyway.
    """
    with torch.device("meta"):
        backbone = build_backbone(arch, patch_size, image_size)
    state = fit_state_dict(backbone, state, describe)
    backbone.load_state_dict(state, strict=True, assign=True)
    return backbone.eval()


def load_backbone_weights(
    path: str | Path, arch: str, patch_size: int, image_size: int = DEFAULT_IMAGE_SIZE
) -> tuple[nn.Module, dict]:
    """Build ``arch``/``patch_size`` at ``image_size`` and load the weights file into it.

    Returns:
        (backbone in eval mode, provenance dict: source, source_sha256, source_format and whatever the
        file records: training config or args, epoch, k-NN result).
    """
    try:
        check_backbone_args(arch, patch_size, image_size)
    except ValueError as exc:
        raise WeightsError(str(exc)) from exc
    state, source_format, extra = read_weights(path)
    config = extra.get("training_config")
    if config and (config.get("arch"), int(config.get("patch_size", 0))) != (arch, patch_size):
        raise WeightsError(
            f"{path}: the checkpoint was trained as {config.get('arch')}/{config.get('patch_size')}, "
            f"not {arch}/{patch_size}"
        )
    backbone = backbone_from_state(arch, patch_size, image_size, state, f"{arch} with patch size {patch_size} ({path})")
    provenance = {
        "source": str(Path(path).resolve()),
        "source_format": source_format,
        "source_sha256": sha256_file(path),
        **{k: v for k, v in extra.items() if v is not None},
    }
    return backbone, provenance
