"""A GGUF's own 4- and 8-bit blocks, split as they are: no second quantization.

A model converted from a GGUF (``edgetp.model.gguf``) keeps a ``gguf_source.json`` naming the
file and each tensor's type. When such a model is split into ``int4`` with groups of at most
32 columns, every Q4_0/Q4_1 matrix is taken straight from the file's blocks (32 input columns,
a float16 scale and, for Q4_1, a float16 minimum): the codes are the file's, ``scale = d`` and
``zero = 0`` (Q4_0) or ``m + 8 d`` (Q4_1), stored as float32 (``edgetp.shard.quant``). Split
into ``int8``, every Q8_0 matrix keeps its codes and float16 block scales. Other types, and
slices whose edges cut a block, are quantized from the float weights as usual.

What the blocks give is checked against the float slice the splitter read from the converted
weights (equal within float rounding, or a warning and the usual quantization): a GGUF file
replaced or moved since the conversion can never put other weights into a split.
``native_dtype`` names the split dtype that keeps most of a file's matrices as they are
(``--dtype native``).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from edgetp.model.gguf import GGUFError, GGUFFile, read_source_record
from edgetp.model.gguf.tensors import row_order
from edgetp.shard.plan import TensorSlice
from edgetp.shard.quant import (
    INT8_BLOCK,
    SCALE_SUFFIX,
    dequantize_int4,
    dequantize_int8,
    int4_from_blocks,
    is_quantized_weight,
)

log = logging.getLogger(__name__)

BLOCK = 32  # input columns per Q4_0 / Q4_1 / Q8_0 block
INT4_TYPES = ("Q4_0", "Q4_1")
INT8_TYPES = ("Q8_0",)
_ROUNDING = {torch.float32: 2.0**-18, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


class GGUFBlocks:
    """The native blocks of the model in ``model_dir`` (none if it was not a GGUF's)."""

    def __init__(self, model_dir: Path) -> None:
        self.record = read_source_record(model_dir)
        self.tensors: dict[str, Any] = self.record["tensors"] if self.record else {}
        self._file: GGUFFile | None = None
        self._unreadable = False

    def native_dtype(self) -> str | None:
        """int4 / int8 if most of the quantized linears are Q4_0/Q4_1 / Q8_0, else None."""
        kinds = Counter(entry["type"] for name, entry in self.tensors.items()
                        if is_quantized_weight(name.removeprefix("model.")))
        if not kinds:
            return None
        top = kinds.most_common(1)[0][0]
        return "int4" if top in INT4_TYPES else "int8" if top in INT8_TYPES else None

    def convert(self, fmt: str, source: str, part: TensorSlice, group: int,
                reference: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """``{name: codes, name_scale: scales}`` for the HF tensor ``source``'s slice ``part``
        taken from the file's blocks, or None when they do not map (then quantize as usual).
        ``reference``: the float slice itself, which the blocks must reproduce."""
        entry = self.tensors.get(source) or (
            self.tensors.get("model.embed_tokens.weight") if source == "lm_head.weight" else None)
        wanted = INT4_TYPES if fmt == "int4" else INT8_TYPES if fmt == "int8" else ()
        if entry is None or entry["type"] not in wanted or (fmt == "int4" and BLOCK % group):
            return None
        tensor = self._tensor(entry["gguf"])
        if tensor is None:
            return None
        if tensor.tensor_type.name != entry["type"]:
            self._replaced(source, entry)
            return None
        rows, columns = _span(part, reference.shape)
        raw = _raw_blocks(tensor, entry, rows, columns)
        if fmt == "int4":
            stored = _int4(raw, entry["type"], columns, group)
            value = dequantize_int4(*stored)
        else:
            if columns.start % INT8_BLOCK or columns.stop % INT8_BLOCK:
                return None
            stored = _int8(raw)
            value = dequantize_int8(*stored)
        if not _reproduces(value, reference):
            self._replaced(source, entry)
            return None
        return {"": stored[0], SCALE_SUFFIX: stored[1]}

    def _replaced(self, source: str, entry: dict[str, Any]) -> None:
        log.warning("%s in %s no longer holds the weights converted from it; %s is quantized "
                    "anew", entry["gguf"], self.record and self.record["path"], source)

    def _tensor(self, name: str) -> gguf.ReaderTensor | None:
        if self._file is None and not self._unreadable:
            path = Path(self.record["path"]) if self.record else None
            try:
                self._file = GGUFFile(path) if path else None
            except GGUFError as exc:
                log.warning("the split cannot reuse the GGUF's own blocks (%s); they are "
                            "quantized anew", exc)
            self._unreadable = self._file is None
        return self._file.tensors.get(name) if self._file else None


def _span(part: TensorSlice, shape: torch.Size) -> tuple[slice, slice]:
    """The HF rows and columns of the slice (``shape``: the slice's own shape)."""
    if part.dim == 0:
        return slice(part.start, part.stop), slice(0, shape[1])
    if part.dim == 1:
        return slice(0, shape[0]), slice(part.start, part.stop)
    return slice(0, shape[0]), slice(0, shape[1])


def _raw_blocks(tensor: gguf.ReaderTensor, entry: dict[str, Any], rows: slice,
                columns: slice) -> np.ndarray:
    """The file's blocks covering ``rows`` x ``columns`` (HF order): uint8 [n, blocks, bytes]."""
    total_rows = int(tensor.shape[1])
    order = row_order(total_rows, int(entry["permuted_heads"]))[rows]
    block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
    first, last = columns.start // BLOCK, -(-columns.stop // BLOCK)
    data = np.asarray(tensor.data[order])  # [n, bytes per row]: reads only these rows
    return data.reshape(len(order), -1, block_bytes)[:, first:last]


def _int4(raw: np.ndarray, kind: str, columns: slice, group: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 blocks -> (packed codes, float32 scale_zero) of the columns, ``group`` wide."""
    scale = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # d [n, nb]
    if kind == "Q4_1":
        minimum = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero, packed = minimum + 8 * scale, raw[..., 4:20]
    else:
        zero, packed = np.zeros_like(scale), raw[..., 2:18]
    codes = np.concatenate((packed & 15, packed >> 4), axis=-1)  # [n, nb, 32]: j and j + 16
    offset = columns.start - columns.start // BLOCK * BLOCK
    width = columns.stop - columns.start
    codes_t = torch.from_numpy(codes.reshape(len(codes), -1)[:, offset:offset + width].copy())
    per_column = np.repeat(np.stack((scale, zero), axis=-1), BLOCK, axis=1)  # [n, nb*32, 2]
    picked = torch.from_numpy(per_column[:, offset:offset + width:group].copy())  # [n, ng, 2]
    return int4_from_blocks(codes_t, picked[..., 0], picked[..., 1], group)


def _int8(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 blocks -> (codes int8 [n, cols], scales float16 [n, cols / 32])."""
    scale = raw[..., 0:2].copy().view(np.float16)[..., 0]  # [n, nb]
    codes = raw[..., 2:34].copy().view(np.int8).reshape(len(raw), -1)  # [n, nb * 32]
    return torch.from_numpy(codes), torch.from_numpy(scale.copy())


def _reproduces(value: torch.Tensor, reference: torch.Tensor) -> bool:
    """``value`` equals ``reference`` (converted weights in their dtype) within rounding."""
    if value.shape != reference.shape:
        return False
    size = float(reference.float().abs().max()) or 1.0
    tolerance = _ROUNDING.get(reference.dtype, 2.0**-7) * size
    return bool((value - reference.float()).abs().max() <= tolerance)
