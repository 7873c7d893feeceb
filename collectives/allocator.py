"""An allocator setting that keeps freed memory in the process (no torch import: the coordinator uses it too).

Freed big buffers returned to the OS come back as fresh pages the kernel must
zero at the next allocation; for the data plane's large, repeated buffers
that cost more than the copies themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc(mmap_threshold: int = 64 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS; False where unsupported.

    Process-wide: loconet's own processes call it at start. Measured on
    loopback: gRPC receive cost fell from ~1.0 to ~0.5 CPU-s per GB.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
        # One arena: per-thread arenas give freed memory back to the OS on their own terms.
        ok = libc.mallopt(_M_ARENA_MAX, 1) == 1 and ok
    except (OSError, AttributeError):
        return False
    if not ok:
        log.debug("mallopt refused the allocator settings")
    return ok
