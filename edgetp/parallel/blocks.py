"""A weight block's bytes: where its tensors lie in a shard file, how they are read into a
buffer, and how its module's parameters are pointed at them.

A *block* is one layer's attention slice or MLP slice (and, on the master, the lm_head). Its
tensors are read straight from their safetensors byte ranges (``pread``, no safetensors
parsing at run time) into consecutive 64-byte aligned ranges of one uint8 buffer; the module's
parameters then become views of that buffer. The page cache the reads fill is released
(``posix_fadvise(DONTNEED)``) so the process's memory figures stay honest.
:class:`DiskEmbedding` reads an embedding's rows the same way, a few rows at a time.

Every read is checked against the checksums the splitter recorded in the manifest
(:mod:`edgetp.shard.checksums`), so a shard file changed on disk after loading fails the
request with a :class:`WindowError` naming the file and the block, instead of wrong output.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgetp.core.errors import EdgetpError
from edgetp.core.pages import aligned_nbytes
from edgetp.shard.checksums import chunk_bytes, first_mismatch
from edgetp.shard.manifest import TensorEntry

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I8": torch.int8, "U8": torch.uint8}


class WindowError(EdgetpError, RuntimeError):
    """A weight read failed or the budget cannot work; the message names the file or minimum."""


@dataclass(frozen=True)
class BlockSpec:
    """Where one block's tensors live on disk and which module parameters they become."""

    name: str  # e.g. "layers.3.mlp"
    module: nn.Module
    path: Path
    tensors: dict[str, TensorEntry]  # parameter name within the module -> bytes on disk

    @property
    def nbytes(self) -> int:
        """Bytes the block takes in a buffer (each tensor starts 64-byte aligned)."""
        return sum(aligned_nbytes(e.offsets[1] - e.offsets[0]) for e in self.tensors.values())

    def placements(self) -> list[tuple[str, TensorEntry, int]]:
        """(parameter name, disk entry, offset in the block's buffer) for every tensor."""
        out, cursor = [], 0
        for name, entry in self.tensors.items():
            out.append((name, entry, cursor))
            cursor += aligned_nbytes(entry.offsets[1] - entry.offsets[0])
        return out


def read_block(block: BlockSpec, storage: torch.Tensor, checker: Executor | None = None) -> float:
    """Read every tensor of ``block`` into consecutive ranges of ``storage`` (uint8), each
    checked against its checksums; a mismatch raises :class:`WindowError`.

    With a ``checker`` (a thread: xxh3 runs without the GIL) a tensor is checked while the
    next one is read, and the time returned is what the checks added after the last read;
    without, each is checked in turn (0.0 is returned).
    """
    try:
        fd = os.open(block.path, os.O_RDONLY)
    except OSError as exc:
        raise WindowError(f"cannot open shard file {block.path}: {exc.strerror}; copy the "
                          "rank directory again") from exc
    pending: list[tuple[str, TensorEntry, Future[int | None]]] = []
    try:
        for name, entry, cursor in block.placements():
            start, stop = entry.offsets
            target = storage[cursor : cursor + stop - start]
            pread_exact(fd, target, start, block.path)
            drop_page_cache(fd, start, stop - start)
            if not entry.xxh3:  # a manifest of an older edgetp: nothing to check against
                continue
            if checker is None:
                _raise_if_changed(block, name, entry, first_mismatch(entry, target.numpy()))
            else:
                pending.append((name, entry,
                                checker.submit(first_mismatch, entry, target.numpy())))
    finally:
        os.close(fd)
    started = time.perf_counter()
    for name, entry, check in pending:
        _raise_if_changed(block, name, entry, check.result())
    return time.perf_counter() - started if pending else 0.0


def _raise_if_changed(block: BlockSpec, tensor: str, entry: TensorEntry, bad: int | None) -> None:
    if bad is not None:
        raise WindowError(changed_on_disk(block.path, block.name, tensor, entry, bad))


def changed_on_disk(path: Path, block: str, tensor: str, entry: TensorEntry, chunk: int) -> str:
    """The message for bytes that fail their checksum: which file, block and bytes, and why."""
    start, stop = chunk_bytes(entry, chunk)
    return (f"shard file {path} changed on disk after the split: block {block} (tensor "
            f"{tensor}, bytes {start}-{stop}) does not match its checksum; restore the file "
            "or split the model again (and copy the rank directory to this node), then restart "
            "the node")


def drop_page_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    """Tell the kernel we will not re-read these bytes (keeps memory figures honest)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def pread_exact(fd: int, target: torch.Tensor, offset: int, path: Path) -> None:
    """Fill ``target`` (contiguous) with the file's bytes from ``offset``; a short file raises."""
    view = target.numpy().data.cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise WindowError(f"short read from shard file {path} at byte {offset + done}: "
                              "the file is truncated; copy it again or re-split")
        done += n


def bind_block(block: BlockSpec, storage: torch.Tensor) -> None:
    """Point the block's parameters at their bytes in ``storage`` (views, no copies)."""
    for name, entry, cursor in block.placements():
        nbytes = entry.offsets[1] - entry.offsets[0]
        dtype = SAFETENSORS_DTYPES[entry.dtype]
        parameter = block.module.get_parameter(name)
        parameter.data = storage[cursor : cursor + nbytes].view(dtype).view(entry.shape)


def clear_block(block: BlockSpec) -> None:
    """Drop the block's weights (its parameters become empty until bound again)."""
    for name in block.tensors:
        block.module.get_parameter(name).data = torch.empty(0)


class DiskEmbedding(nn.Module):
    """An embedding table left on disk: a lookup reads just the rows it needs.

    tokens [T] -> [T, d]. With checksums (:mod:`edgetp.shard.checksums`) a lookup reads the
    chunks of whole rows its tokens fall in (~64 KiB each) and checks them; without (a
    manifest of an older edgetp), just the rows. The table (2 GB for a 70B model in bfloat16)
    never occupies memory.
    """

    def __init__(self, path: Path, entry: TensorEntry, dtype: torch.dtype) -> None:
        super().__init__()
        self.path = path
        self.entry = entry
        self.vocab_size, self.dim = entry.shape
        self.stored = SAFETENSORS_DTYPES[entry.dtype]
        self.row_bytes = self.dim * torch.empty((), dtype=self.stored).element_size()
        self.offset = entry.offsets[0]
        self.dtype = dtype
        chunk = entry.xxh3_chunk if entry.xxh3 else 0
        self.rows_per_chunk = chunk // self.row_bytes if chunk % self.row_bytes == 0 else 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [T] -> [T, d]
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token id out of range for a vocabulary of {self.vocab_size}")
        out = torch.empty(tokens.numel(), self.row_bytes, dtype=torch.uint8)  # [T, row bytes]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if self.rows_per_chunk:
                self._read_checked(fd, tokens.tolist(), out)
            else:
                for i, token in enumerate(tokens.tolist()):
                    pread_exact(fd, out[i], self.offset + token * self.row_bytes, self.path)
        finally:
            os.close(fd)
        return out.view(self.stored).view(tokens.numel(), self.dim).to(self.dtype)

    def _read_checked(self, fd: int, tokens: list[int], out: torch.Tensor) -> None:
        """Fill ``out``'s rows from the checked chunks the tokens fall in (each read once)."""
        wanted: dict[int, list[int]] = {}
        for i, token in enumerate(tokens):
            wanted.setdefault(token // self.rows_per_chunk, []).append(i)
        for chunk, positions in wanted.items():
            start, stop = chunk_bytes(self.entry, chunk)
            data = torch.empty(stop - start, dtype=torch.uint8)  # [rows of the chunk x row]
            pread_exact(fd, data, start, self.path)
            if first_mismatch(self.entry, data.numpy(), chunk) is not None:
                raise WindowError(changed_on_disk(self.path, "embed_tokens", "embed_tokens."
                                                  "weight", self.entry, chunk))
            rows = data.view(-1, self.row_bytes)  # [rows of the chunk, row bytes]
            for i in positions:
                out[i] = rows[tokens[i] - chunk * self.rows_per_chunk]
