"""The model folder contract shared by its writers (``dino export``, ``dino import``) and its reader
(the service): file names, output names, format version and the file hash.

It imports neither torch nor onnxruntime, so that both sides can use it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, NotRequired, TypedDict

#: the file that marks a complete model folder (written last by ``dino export``)
METADATA_FILE = "model.json"
#: version of model.json written by the exporter; the service reads this version
FORMAT_VERSION = 1
#: the graph's outputs, in order, from one forward pass
OUTPUT_NAMES = ("embedding", "patch_tokens", "attention")
#: bytes read at a time when hashing files
HASH_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class OutputSpec(TypedDict):
    """One output of the graph in model.json: its name and shape (symbolic dims as strings)."""

    name: str
    shape: list[int | str]


class ModelMetadata(TypedDict):
    """``model.json``: what a client needs to preprocess images and read the outputs, and where the
    weights came from. Written last by ``dino export``/``dino import``; read by the service."""

    format_version: int
    name: str
    arch: str
    patch_size: int
    embed_dim: int
    num_heads: int
    image_size: int  #: side of the centre crop the model was exported for
    resize_size: int  #: shorter-side resize before the crop
    mean: list[float]
    std: list[float]
    input_name: str
    input_shape: list[int | str]
    outputs: list[OutputSpec]
    attention_normalisation: str
    dynamic_hw: bool  #: height and width may differ from image_size (multiples of the patch size)
    opset: int
    file: str
    sha256: str
    fp16_file: NotRequired[str]
    fp16_sha256: NotRequired[str]
    int8_file: NotRequired[str]
    int8_sha256: NotRequired[str]
    #: how the int8 file was made and its measured drop (``knn_drop_points``: k-NN top-1 lost, or None)
    int8: NotRequired[dict[str, Any]]
    provenance: dict[str, Any]  #: source file, training config, epoch, k-NN result, versions
    export: dict[str, Any]  #: per file: export time, size, checker result, parity with PyTorch
