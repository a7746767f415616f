"""Process memory settings: freed memory given back between stages, and no huge-page advice for numpy's arrays.

A stage that streams large arrays (calibration's batches, recovery's frontier, onnxruntime's outputs) frees them
when it ends, but glibc's allocator keeps much of that memory in its heaps for reuse: measured on ResNet-50 at
224 x 224, batch 64, 0.6 GiB stayed resident after calibration (1.50 GiB resident, 0.88 after a trim), and the
next stage's peak sat on top of it. :func:`release_memory` collects Python's garbage and asks glibc to return
free heap pages (``malloc_trim(0)``); elsewhere (no glibc) it only collects.

On Linux, numpy advises the kernel to back every large array with transparent huge pages (``madvise(MADV_HUGEPAGE)``).
When free memory is fragmented, as on long-running virtual machines, each 2 MB fault then waits for the kernel to
compact memory: measured by ``benchmarks/fresh_memory.py`` on a 2-core VM (THP ``madvise`` mode), 147 MB arrays
filled after every 3 s of compute at 0.13 GB/s with the advice and 1.58 GB/s without it; on ResNet-50, 256 images,
three interleaved pairs, calibration took 15.8-17.5 s with it and 13.7-14.5 s without, DI scoring 10.3-12.3 s and
8.0-9.4 s. :func:`no_huge_page_advice` turns the advice off for the process (the CLI calls it at start) unless
the user decided with numpy's own ``NUMPY_MADVISE_HUGEPAGE`` variable. Values are unchanged: only where pages come
from differs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
from typing import Any


@functools.cache
def _libc() -> Any | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_memory() -> None:
    """Collect garbage and return the allocator's free pages to the operating system (glibc only)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def set_huge_page_advice(on: bool) -> bool | None:
    """Turn numpy's huge-page advice for its arrays on or off in this process; returns whether it was on before
    (None when this numpy has no such switch, then nothing changes)."""
    import numpy as np

    core = getattr(np, "_core", None) or getattr(np, "core", None)
    setter = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    return None if setter is None else bool(setter(on))


def no_huge_page_advice() -> bool:
    """Stop numpy from advising huge pages for its arrays in this process (see the module docstring), unless
    ``NUMPY_MADVISE_HUGEPAGE`` is set (the user's choice stands); returns whether this turned the advice off (False
    when it was off already, when the variable decides, or when numpy has no switch)."""
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return False
    return bool(set_huge_page_advice(False))
