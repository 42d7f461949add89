"""Changing files behind edgetp's back, as a user's tools do: in place, same size, and if asked
with the old modification time put back (``os.utime``), so only content and ctime differ."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save


def stat_key(path: Path) -> tuple[int, int, int]:
    """What a cheap cache key looks at: (size, mtime_ns, inode)."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def write_in_place(path: Path, data: bytes, offset: int = 0, keep_mtime: bool = True) -> None:
    """Overwrite ``data`` at ``offset`` of the existing file (same inode, size unchanged)."""
    before = path.stat()
    assert offset + len(data) <= before.st_size, "the write would grow the file"
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def resave_safetensors(path: Path, change: Callable[[str, torch.Tensor], torch.Tensor],
                       keep_mtime: bool = True) -> None:
    """Save new values of the same names, shapes and dtypes over ``path``, in place, as a
    fine-tune saved over its base model does; the file keeps its size (and inode)."""
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: change(name, handle.get_tensor(name)).contiguous()
                   for name in handle.keys()}
    data = save(tensors, metadata=metadata)
    assert len(data) == path.stat().st_size, "same shapes and dtypes must give the same size"
    write_in_place(path, data, keep_mtime=keep_mtime)


def flip_bytes(path: Path, offset: int, length: int = 16, keep_mtime: bool = True) -> None:
    """Invert ``length`` bytes at ``offset`` in place (same size; mtime kept if asked)."""
    with path.open("rb") as handle:
        handle.seek(offset)
        old = handle.read(length)
    write_in_place(path, bytes(b ^ 0xFF for b in old), offset, keep_mtime)
