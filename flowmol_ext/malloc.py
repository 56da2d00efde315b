"""Process-wide glibc malloc settings for CPU tensor work.

PyTorch's CPU allocator takes every tensor from ``malloc`` and frees it right away; there is no caching
allocator on the CPU. glibc serves blocks above its mmap threshold (128 KiB at start, adapting upward to at
most 32 MiB) with fresh ``mmap`` pages and trims the heap top back to the OS above 128 KiB of free space, so the
network's per-edge activations (E × 128 floats, ~15 MB for 100 QM9 molecules) are page-faulted in again on
every call: measured 4.4 million minor faults for 100 molecules × 10 sampling steps of the small model, against
91,000 with the settings below.

:func:`keep_freed_memory` raises both thresholds so freed tensor memory stays in the heap and is reused. The
cost is resident memory: the process keeps up to its peak working set instead of returning it to the OS. The
``fdc-mol`` CLI calls it once at start-up; set ``FDC_MOL_MALLOC=default`` to keep glibc's defaults. glibc reads
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` from the environment itself; when either is set, this
leaves the user's choice alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX), bytes
TRIM_THRESHOLD = 2**30  # free heap top kept before returning memory to the OS, bytes

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to 32 MiB and its trim threshold to 1 GiB for this process (once).

    Returns True when the settings are in effect (now or from an earlier call), False where they do not apply:
    not Linux/glibc, ``FDC_MOL_MALLOC=default``, or the user set glibc's own ``MALLOC_*_THRESHOLD_`` variables.
    Results of every computation are unchanged; only where freed memory goes differs.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if (sys.platform != "linux" or os.environ.get("FDC_MOL_MALLOC", "").lower() == "default"
            or "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _applied
