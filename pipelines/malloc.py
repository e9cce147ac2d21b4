"""Keep freed heap memory in the process, so the loaders' per-batch temporaries are not faulted in afresh.

A loader allocates and frees the same few MB-sized temporaries for every
image and batch: decoded images, resized images, the float chunks of view
2's photometric ops. glibc's malloc returns freed memory at the top of a
heap to the OS once more than its trim threshold is free, and serves blocks
above its mmap threshold with fresh mappings; both thresholds start low
(128 KB) and only creep up as large blocks are freed, and a loader thread's
arena kept crossing them: every batch faulted its temporaries in again
(about 150 page faults per image in CPU-only LUT training, 15 % of its CPU
time; 15 per image and 3-7 % with view 2's ops left to the device).

``keep_freed_memory`` sets both thresholds once per process to where glibc's
own heuristic tops out (32 MB for mmap, twice that for trimming): freed
blocks up to 32 MB are kept for reuse, and at most 64 MB of free memory per
heap is held back from the OS. Nothing else about allocation changes.

It does nothing off glibc, when the user chose malloc settings through the
environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``GLIBC_TUNABLES``), or with ``LUT_FAST_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

MMAP_THRESHOLD = 32 << 20  # glibc's upper bound for its dynamic mmap threshold (64-bit)
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc's heuristic pairs with it
OPT_OUT = "LUT_FAST_MALLOC_TUNING"  # "0": leave malloc as it is
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)

_lock = threading.Lock()
_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process (see the module doc); True if they are set."""
    with _lock:
        if "set" not in _state:
            _state["set"] = _apply()
        return _state["set"]


def _apply() -> bool:
    if os.environ.get(OPT_OUT, "1").strip() == "0" or any(k in os.environ for k in USER_SETTINGS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # mallopt returns 1 on success; the mmap threshold first, so no block is ever above both
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # no such library or symbol: leave malloc alone
        return False
