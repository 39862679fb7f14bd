"""Keep freed memory in the process while training on CPU (glibc malloc only).

A training step allocates and frees the same megabyte-sized activations every step. glibc serves blocks above
its mmap threshold with fresh mmap()s and gives trimmed heap tops back to the kernel, so every step page-faults
its activations in again (about 250 faults per step of the default capacity grid, 5% of its time). Raising the
mmap threshold and the trim threshold lets freed blocks be reused instead: the standard remedy on CPU (what
PyTorch's tuning guide gets by preloading jemalloc or tcmalloc), here without a second allocator. The process's
resident memory then stays at its peak until exit, which is what a training process holds anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


@functools.cache
def keep_freed_memory() -> bool:
    """Tune glibc malloc for repeated same-sized allocations (once per process); False where it is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
