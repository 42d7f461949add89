"""Keeping glibc's malloc from holding freed memory in a process under a memory budget.

glibc serves an allocation of at least its *mmap threshold* (128 KiB at start) with a mapping
of its own, returned to the kernel when freed. But the threshold is dynamic: freeing such a
mapping raises it to that size (up to 32 MiB), and from then on allocations that size come from
the heap, where a small allocation that outlives them pins the memory they freed. A node's
prefill frees exactly such tensors, a few [T, hidden] float32 activations per layer (1 MiB at
T = 32 and a 70B model's 8192 columns) and the head's 16 MiB dequantized chunks, and keeps small
ones (step buffers, metrics); measured on rank 0 of Llama 2 70B in int4 over 8 ranks with a
2.57 GB budget, its resident memory grew 1.3 MiB per layer through a 32-token prefill (100 MiB
over 80 layers), and another 100 MiB at the head, none of it in any budget: 2951 MiB at its
peak against the planner's 2762 MiB, and the master of the 80-layer benchmark was killed by
its 3.1 GB cgroup. With the threshold fixed the same run peaks at 2792 MiB (the planner's
figure + 1%).

:func:`fix_mmap_threshold` sets the threshold (which also stops glibc adjusting it, and its
trim threshold); the loader calls it for every node given a memory budget.

A node without a budget wants the opposite: :func:`keep_freed_memory` serves every activation
(up to 32 MiB) from the heap and lets the heap keep up to 64 MiB free at its top, so a prefill
chunk's tensors reuse the pages the last layer's freed. With glibc's own dynamic thresholds
they did not: a 256-token prefill of the 1.1B benchmark model faulted in 170-330 MB of fresh
pages (40-80 thousand minor faults, ~0.1 s of system time, 8-10% of its time to first token).
The memory a node holds then stays at its peak, which is what it must have anyway.

Elsewhere (musl, macOS, Windows: no ``mallopt``) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 128 << 10  # glibc's own starting value: anything larger is a mapping of its own
TRIM_THRESHOLD = 128 << 10  # glibc's own: free memory above this at the heap's top goes back
KEPT_MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
KEPT_TRIM_THRESHOLD = 64 << 20

_applied: list[tuple[int, int]] = []  # the (mmap, trim) thresholds set in this process


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (and its trim
    threshold at glibc's default); whether it was set (False where the C library has no
    ``mallopt``, or refuses)."""
    return _set_thresholds(threshold, TRIM_THRESHOLD)


def keep_freed_memory() -> bool:
    """Serve allocations up to :data:`KEPT_MMAP_THRESHOLD` from the heap and keep up to
    :data:`KEPT_TRIM_THRESHOLD` of freed memory there (for a node without a memory budget);
    whether it was set."""
    return _set_thresholds(KEPT_MMAP_THRESHOLD, KEPT_TRIM_THRESHOLD)


def _set_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    if _applied and _applied[-1] == (mmap_threshold, trim_threshold):
        return True
    mallopt = _mallopt()
    if (mallopt is None or mallopt(M_TRIM_THRESHOLD, trim_threshold) != 1
            or mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1):
        return False
    _applied.append((mmap_threshold, trim_threshold))
    return True


def mmap_threshold_fixed() -> int | None:
    """The threshold :func:`fix_mmap_threshold` set in this process (None: never set)."""
    return _applied[-1][0] if _applied else None


def _mallopt():  # noqa: ANN202 - a ctypes function or None
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt
