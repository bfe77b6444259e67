"""glibc malloc settings for CPU inference: keep freed memory for reuse instead of returning it to the OS.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh `mmap` and unmaps
it on free, so each large activation of a wide model is page-faulted in again, page by page. On the
development VM an elementwise op on a 44 MB tensor took 17 ms that way and 2.5 ms into reused memory.
With mmap off and trimming off, freed blocks stay in the heap and the next activation reuses them.
Process-wide, so it is opt-in: nothing calls it by default (`benchmarks/vs_official.py` does for our side).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters of glibc's malloc.h


def retain_freed_memory() -> bool:
    """Tell glibc to serve large allocations from the heap and never trim it. True when applied
    (Linux with glibc); elsewhere nothing changes and it returns False."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
