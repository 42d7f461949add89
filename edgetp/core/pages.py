"""Memory for weights that are read whole every token: backed by transparent huge pages.

A decode step streams every resident weight once, and with 4 KiB pages the reader takes a TLB
miss every 4 KiB: measured on a 2-vCPU EPYC (THP in ``madvise`` mode, the usual default), one
thread's native streaming reader ran at 24 GB/s over 4 KiB pages and at 29 GB/s over 2 MiB
ones, in the same run. Weights loaded from safetensors were worse still placed: views of the
file's private mapping, page-cache pages of 4 KiB that a cgroup's reclaim may even drop.

:func:`huge_page_bytes` maps anonymous memory of its own, aligned to 2 MiB, and asks the kernel
(``madvise(MADV_HUGEPAGE)``) for huge pages on its whole 2 MiB spans only, so the memory it holds
is what was asked for, never rounded up. :func:`pack` copies tensors into one such buffer.
Where there is no ``MADV_HUGEPAGE`` (macOS, Windows) both fall back to torch's allocator.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import torch

HUGE_PAGE = 2 << 20
# Where each tensor starts in a buffer. CPU kernels pick their code path by alignment, so a
# decode step's products would round differently in the last bits if a tensor started at, say,
# 16 or 56 mod 64 (as safetensors hands them out): resident, pinned and streamed weights all
# start 64-byte aligned, so a memory budget never changes the output.
ALIGNMENT = 64


def huge_pages_supported() -> bool:
    """Whether this platform can ask for transparent huge pages on a mapping."""
    return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")


def huge_page_bytes(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 [nbytes] buffer, 2 MiB-aligned, whose whole 2 MiB spans are advised
    to be huge pages (the rest, if any, are ordinary pages). Freed with its last view. Buffers
    under one huge page come from torch's allocator."""
    if nbytes < HUGE_PAGE or not huge_pages_supported():
        return torch.empty(nbytes, dtype=torch.uint8)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # shared anonymous memory is shmem: no THP
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=flags)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping while viewed
    start = -whole.data_ptr() % HUGE_PAGE
    span = nbytes // HUGE_PAGE * HUGE_PAGE
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, start, span)
    except OSError:
        pass  # THP compiled out or disabled: ordinary pages, as torch's allocator gives
    return whole[start:start + nbytes]


def aligned_nbytes(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """``nbytes`` rounded up to a multiple of ``alignment`` (a tensor's room in a buffer)."""
    return -(-nbytes // alignment) * alignment


def pack(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of ``tensors`` (same shapes, dtypes and values), one after another in
    one :func:`huge_page_bytes` buffer, each ``ALIGNMENT``-aligned; they keep it alive
    together."""
    sizes = [tensor.numel() * tensor.element_size() for tensor in tensors]
    buffer = huge_page_bytes(sum(aligned_nbytes(n) for n in sizes))
    copies, offset = [], 0
    for tensor, nbytes in zip(tensors, sizes, strict=True):
        copy = buffer[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
        copies.append(copy.copy_(tensor))
        offset += aligned_nbytes(nbytes)
    return copies
