"""Files that survive a crash: written whole or not at all, and renames made durable.

Used by the FAISS gallery folder and by ``dino embed``'s Parquet dataset.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename/creation inside ``path`` durable (no-op where directories cannot be opened)."""
    if sys.platform.startswith("win"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Atomically replace ``path`` with ``data``: temporary file, fsync, rename (+ fsync of the folder)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
