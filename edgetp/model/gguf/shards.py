"""Writing a Hugging Face checkpoint one piece of a tensor at a time, in files of bounded size.

:class:`ShardedWriter` is told every tensor's name, dtype and shape first (:class:`Planned`),
assigns them to ``model-0000K-of-0000N.safetensors`` files of about ``max_file_bytes`` each
(a tensor larger than that gets a file of its own) and writes
``model.safetensors.index.json``, or a single ``model.safetensors`` when one file suffices.
Since every size is known in advance, each file's safetensors header (8-byte length, JSON of
dtypes, shapes and byte ranges) is written first and the tensors' bytes are then appended in
row chunks as the caller produces them: memory holds one chunk, never a file or a tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from edgetp.model.checkpoint import INDEX_FILE, SINGLE_FILE

SAFETENSORS_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
DEFAULT_FILE_BYTES = 2 << 30


@dataclass(frozen=True)
class Planned:
    """A tensor to write: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count * torch.empty((), dtype=self.dtype).element_size()


def group_files(tensors: list[Planned], max_file_bytes: int) -> list[list[Planned]]:
    """Consecutive tensors in files of at most ``max_file_bytes`` (one tensor at least)."""
    files: list[list[Planned]] = [[]]
    size = 0
    for tensor in tensors:
        if files[-1] and size + tensor.nbytes > max_file_bytes:
            files.append([])
            size = 0
        files[-1].append(tensor)
        size += tensor.nbytes
    return files


def file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


class ShardedWriter:
    """Writes the planned tensors in order: ``open(name)`` a tensor, then ``write`` its rows."""

    def __init__(self, out_dir: Path, tensors: list[Planned],
                 max_file_bytes: int = DEFAULT_FILE_BYTES) -> None:
        self.out_dir = out_dir
        self.files = group_files(tensors, max_file_bytes)
        self.names = file_names(len(self.files))
        self.file_of = {t.name: name for name, group in zip(self.names, self.files, strict=True)
                        for t in group}

    def write_index(self) -> None:
        if len(self.names) == 1:
            return
        total = sum(t.nbytes for group in self.files for t in group)
        index = {"metadata": {"total_size": total}, "weight_map": self.file_of}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))

    def write_files(self) -> Iterator[tuple[Planned, _TensorSink]]:
        """For each planned tensor in order, a sink its bytes must be written to, in full."""
        for name, group in zip(self.names, self.files, strict=True):
            tmp = self.out_dir / f".{name}.tmp"
            with tmp.open("wb") as handle:
                handle.write(_header(group))
                for tensor in group:
                    sink = _TensorSink(handle, tensor)
                    yield tensor, sink
                    sink.check_complete()
            os.replace(tmp, self.out_dir / name)


class _TensorSink:
    """Takes a tensor's rows in order and checks that they add up to the planned tensor."""

    def __init__(self, handle: BinaryIO, planned: Planned) -> None:
        self.handle = handle
        self.planned = planned
        self.written = 0

    def write(self, rows: torch.Tensor) -> None:
        data = rows.to(self.planned.dtype).contiguous()
        if data.shape[1:] != self.planned.shape[1:]:
            raise ValueError(f"{self.planned.name}: rows of shape {tuple(data.shape)} for a "
                             f"tensor of shape {self.planned.shape}")
        raw = data.view(-1).view(torch.uint8).numpy()
        self.handle.write(raw.tobytes())
        self.written += raw.nbytes

    def check_complete(self) -> None:
        if self.written != self.planned.nbytes:
            raise ValueError(f"{self.planned.name}: {self.written} of "
                             f"{self.planned.nbytes} bytes written")


def _header(group: list[Planned]) -> bytes:
    """The safetensors header of a file holding ``group`` in order, padded to 8 bytes."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt", "producer": "edgetp"}}
    offset = 0
    for tensor in group:
        entries[tensor.name] = {"dtype": SAFETENSORS_CODES[tensor.dtype],
                                "shape": list(tensor.shape),
                                "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text
