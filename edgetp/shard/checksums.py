"""Per-tensor checksums of a shard's files: recorded by the splitter, checked on every re-read.

With a memory budget the sliding window reads its streamed blocks from disk every token, and
the master reads its embedding table by rows, long after the sha256 check at load time. A file
overwritten meanwhile (same size, even the old modification time) would silently give wrong
answers, so the manifest records for every tensor the xxh3_64 of its bytes, and each re-read
is checked against it (xxh3 hashes at memory speed, ~10 GB/s on one core, far faster than a
disk delivers).

A tensor has one checksum for all its bytes, the unit a window block reads, except the
embedding table, which is read a few rows at a time: it has one per chunk of whole rows of
about :data:`EMBED_CHUNK_BYTES`, and a lookup reads and checks the chunks its rows are in.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch
import xxhash

from edgetp.core.errors import ShardError
from edgetp.shard.manifest import FileEntry, TensorEntry, tensor_entries
from edgetp.shard.stamps import HASH_CHUNK

EMBED_CHUNK_BYTES = 64 << 10  # what a lookup of one token reads with checksums
ROW_CHUNKED = ("embed_tokens.weight",)  # tensors read by rows, not whole


def checksum_chunk(name: str, entry: TensorEntry) -> int:
    """Bytes per checksum of tensor ``name``: whole rows of ~64 KiB for tables read by rows,
    else 0 (one checksum of the whole tensor)."""
    if name not in ROW_CHUNKED or len(entry.shape) != 2 or not entry.shape[0]:
        return 0
    row = (entry.offsets[1] - entry.offsets[0]) // entry.shape[0]
    return max(1, EMBED_CHUNK_BYTES // row) * row if row else 0


def describe_file(path: Path) -> FileEntry:
    """A safetensors file's manifest entry: its size and sha256, and each tensor's byte range
    and checksums; the file is read once, and its page cache dropped behind."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        header = prefix + handle.read(struct.unpack("<Q", prefix)[0])
        tensors = tensor_entries(header)
        sha256 = hashlib.sha256(header)
        described = {}
        cursor = len(header)
        for name, entry in sorted(tensors.items(), key=lambda item: item[1].offsets):
            start, stop = entry.offsets
            _feed(handle, cursor, start, [sha256], path)  # nothing in between, normally
            chunk = checksum_chunk(name, entry)
            digests = _digests(handle, start, stop, chunk, sha256, path)
            described[name] = TensorEntry(entry.dtype, entry.shape, entry.offsets,
                                          tuple(digests), chunk)
            cursor = stop
        _feed(handle, cursor, os.fstat(handle.fileno()).st_size, [sha256], path)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    ordered = {name: described[name] for name in tensors}  # the header's order
    return FileEntry(os.path.getsize(path), sha256.hexdigest(), ordered)


def describe_written(path: Path, tensors: dict[str, torch.Tensor]) -> FileEntry:
    """What :func:`describe_file` says of the safetensors file just written at ``path`` from
    ``tensors``, hashed from the tensors in memory: only the header is read back. A file whose
    data is not exactly the tensors' bytes back to back is described from disk instead."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        header = prefix + handle.read(struct.unpack("<Q", prefix)[0])
        size = os.fstat(handle.fileno()).st_size
    entries = tensor_entries(header)
    ordered = sorted(entries.items(), key=lambda item: item[1].offsets)
    data = {name: _tensor_bytes(tensors[name]) for name in entries if name in tensors}
    if not _laid_out(ordered, data, len(header), size):
        return describe_file(path)
    sha256 = hashlib.sha256(header)
    described = {}
    for name, entry in ordered:
        view, chunk = data[name], checksum_chunk(name, entry)
        sha256.update(view)
        step = chunk or max(len(view), 1)
        digests = tuple(xxhash.xxh3_64_intdigest(view[i : i + step])
                        for i in range(0, max(len(view), 1), step))
        described[name] = TensorEntry(entry.dtype, entry.shape, entry.offsets, digests, chunk)
    return FileEntry(size, sha256.hexdigest(), {name: described[name] for name in entries})


def _laid_out(ordered: list[tuple[str, TensorEntry]], data: dict[str, memoryview],
              start: int, size: int) -> bool:
    """Whether the file's bytes from ``start`` (the header's end) to ``size`` are ``data``'s
    views in the order of their entries, back to back (what ``save_file`` writes)."""
    cursor = start
    for name, entry in ordered:
        if name not in data or entry.offsets != (cursor, cursor + len(data[name])):
            return False
        cursor = entry.offsets[1]
    return cursor == size


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes as a file holds them (contiguous, the machine's byte order)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if not flat.numel():
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy().data).cast("B")


def _digests(handle: BinaryIO, start: int, stop: int, chunk: int, sha256: Any,
             path: Path) -> list[int]:
    """xxh3_64 of each ``chunk`` bytes of ``[start, stop)`` (one if ``chunk`` is 0)."""
    step = chunk or max(stop - start, 1)
    digests = []
    for begin in range(start, max(stop, start + 1), step):
        state = xxhash.xxh3_64()
        _feed(handle, begin, min(begin + step, stop), [sha256, state], path)
        digests.append(state.intdigest())
    return digests


def _feed(handle: BinaryIO, start: int, stop: int, hashes: list[Any], path: Path) -> None:
    """Read ``[start, stop)`` and update every hash with it."""
    handle.seek(start)
    left = stop - start
    while left > 0:
        data = handle.read(min(HASH_CHUNK, left))
        if not data:
            raise ShardError(f"{path} ended at byte {stop - left}: a tensor lies beyond its end")
        for state in hashes:
            state.update(data)
        left -= len(data)


def first_mismatch(entry: TensorEntry, data: Any, first_chunk: int = 0) -> int | None:
    """The index of the first chunk of ``data`` (the tensor's bytes from chunk ``first_chunk``
    on, any buffer) whose checksum fails, or None; None too for a tensor without checksums."""
    if not entry.xxh3:
        return None
    view = memoryview(data).cast("B")
    step = entry.xxh3_chunk or max(len(view), 1)
    for offset in range(0, max(len(view), 1), step):
        index = first_chunk + offset // step
        if index >= len(entry.xxh3) or (
                xxhash.xxh3_64_intdigest(view[offset : offset + step]) != entry.xxh3[index]):
            return index
    return None


def chunk_bytes(entry: TensorEntry, index: int) -> tuple[int, int]:
    """The absolute byte range in the file that checksum ``index`` of ``entry`` covers."""
    start, stop = entry.offsets
    if not entry.xxh3_chunk:
        return start, stop
    return start + index * entry.xxh3_chunk, min(start + (index + 1) * entry.xxh3_chunk, stop)
