"""The model folder contract shared by its writers (``dino export``, ``dino import``) and its reader
(the service): file names, output names, format version and the file hash.

It imports neither torch nor onnxruntime, so that both sides can use it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

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
