"""The one numba decorator of lut-fast's CPU kernels, with numba's on-disk cache in lut-fast's cache folder.

Used by ``area_resize`` (FFCV's and DALI's shrink), ``ffcv_ops`` and ``photometric_numba`` (the torch
backend's CPU ops). ``cache=True`` keeps each kernel's machine code on disk: the first use compiles, later
processes load it. ``nogil=True`` lets loader threads run the kernels in parallel.
"""

from __future__ import annotations

import os

import numba


def use_lut_fast_cache_dir() -> None:
    """Keep numba's on-disk cache under lut-fast's cache folder (``$LUT_FAST_CACHE``, else ~/.cache/lut_fast).

    Without it numba writes beside the installed sources, or, where those are read-only (a system
    install, a container image), under a per-user folder of its own; one known place is easier to
    keep between container runs (mount it) and to clear. ``NUMBA_CACHE_DIR`` set by the user wins.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    from lut_fast.datasets.builtin import cache_root

    # One folder per import name: numba keys its cache by source file, and a kernel cached while imported
    # as ``pipelines.*`` (a script run from a checkout's root) names that module, so a process that has
    # only ``lut_fast.pipelines`` failed to load it ("No module named 'pipelines'").
    numba.config.CACHE_DIR = str(cache_root() / "numba" / __name__.split(".")[0])


use_lut_fast_cache_dir()
jit = numba.njit(cache=True, nogil=True)
