"""The CPU memory allocator of a training process.

glibc's ``malloc`` serves every block larger than its mmap threshold (at most 32 MiB)
with a fresh ``mmap`` and returns it to the system on ``free``. A CPU training step
allocates activations and gradients of tens of MiB each, so every step maps them anew
and the kernel zero-fills each page on first touch: on a 2-core machine a small CNN's
forward + backward over 512 images at 32 px spends half its time in those page faults
(494 ms against 248 ms, ``bench/allocator.py``). Keeping freed memory in the heap for
the next step removes that cost; it is what tcmalloc or jemalloc (the usual
``LD_PRELOAD`` advice for CPU training) do, here without an extra library.

The price is that the process keeps its peak heap instead of returning freed blocks to
the system between steps, which is what a training loop reuses anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536  # glibc's defaults
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_state = {"cache": False}


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (musl has no mallopt effect)
    except (OSError, AttributeError):
        return None
    return libc


def cache_freed_memory(enable: bool = True) -> bool:
    """Make glibc keep freed memory for reuse (``enable``: no mmap for large blocks, no
    trimming of the heap) or restore its defaults. Returns whether the setting took
    effect (False off glibc, where nothing changes)."""
    libc = _glibc()
    if libc is None:
        return False
    mmap_max, trim = (0, 2**31 - 1) if enable else (_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
    ok = bool(libc.mallopt(_M_MMAP_MAX, mmap_max)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim))
    if ok:
        _state["cache"] = enable
    return ok


def caching() -> bool:
    """Whether :func:`cache_freed_memory` is in effect in this process."""
    return _state["cache"]
