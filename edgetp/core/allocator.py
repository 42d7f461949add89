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
trim threshold); the loader calls it for every node given a memory budget. Elsewhere (musl,
macOS, Windows: no ``mallopt``) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 128 << 10  # glibc's own starting value: anything larger is a mapping of its own

_applied: list[int] = []  # the threshold set in this process, if any


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process; whether it was set
    (False where the C library has no ``mallopt``, or refuses)."""
    if _applied and _applied[-1] == threshold:
        return True
    mallopt = _mallopt()
    if mallopt is None or mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        return False
    _applied.append(threshold)
    return True


def mmap_threshold_fixed() -> int | None:
    """The threshold :func:`fix_mmap_threshold` set in this process (None: never set)."""
    return _applied[-1] if _applied else None


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
