"""Giving memory back to the system after large images, on glibc.

Decoding a large image allocates tens of megabytes at a time (Pillow's image blocks, NumPy arrays).
glibc serves allocations above its mmap threshold with mmap and returns them on free, but it raises
that threshold each time such a block is freed (up to 32 MB), so the next large blocks come from the
per-thread heaps, which keep the memory after it is freed: an idle server that has decoded a few
large uploads kept over a gigabyte. Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``) turns that
adjustment off, so every large block is mapped and unmapped again.

Elsewhere than glibc (musl, macOS) this does nothing: those allocators behave differently, and the
service works the same, only with a larger idle footprint after large uploads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: mallopt parameter numbers of glibc's malloc.h
M_MMAP_THRESHOLD = -3
#: allocations of at least this many bytes are mapped, and unmapped when freed (glibc's default
#: starting point; fixed, it is no longer raised as large blocks are freed)
MMAP_THRESHOLD_BYTES = 128 * 1024


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def return_large_blocks_to_the_system() -> bool:
    """Fix glibc's mmap threshold (see the module docstring). True when it was set."""
    libc = _libc()
    if libc is None:
        log.debug("not glibc: large allocations are left to the system allocator")
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    log.debug("glibc mmap threshold fixed at %d bytes: %s", MMAP_THRESHOLD_BYTES, ok)
    return ok
