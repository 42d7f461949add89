"""``convert_gguf``: a GGUF file -> a Hugging Face model directory edgetp (and transformers) load.

The directory gets ``config.json``, ``generation_config.json``, ``tokenizer.json``,
``tokenizer_config.json`` (:mod:`.hfconfig`, :mod:`.vocab`), the weights as safetensors in files
of bounded size with an index (:mod:`.shards`), and ``gguf_source.json``: where the weights came
from (the GGUF's path and size, and each tensor's GGUF name, type and row reordering), which
lets the splitter reuse the file's own 4- and 8-bit blocks (``edgetp.shard.gguf_blocks``).

Weights are written in one dtype: float16 or bfloat16 when every matrix of the file is stored
so (norms widened by llama.cpp are narrowed back, exactly for any model trained in that dtype),
otherwise float32, the only type that holds a dequantized block (``scale * q + min``) exactly.
Tensors are read, dequantized and written a chunk of rows at a time, so memory stays at one
chunk (:data:`CHUNK_BYTES`) whatever the model's size. The directory is built beside ``out_dir``
and renamed into place when complete, so a reader never sees half a conversion.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import torch

from edgetp.core.errors import ConfigError
from edgetp.model.gguf.hfconfig import check_architecture, generation_config, hf_config
from edgetp.model.gguf.reader import GGUFError, GGUFFile
from edgetp.model.gguf.shards import DEFAULT_FILE_BYTES, Planned, ShardedWriter
from edgetp.model.gguf.tensors import (
    FLOAT_TYPES,
    check_type,
    hf_name,
    hf_shape,
    permuted_heads,
    read_rows,
    row_order,
)
from edgetp.model.gguf.vocab import tokenizer_files

GGUF_SOURCE_FILE = "gguf_source.json"
SOURCE_FORMAT = "edgetp-gguf-source-1"
CHUNK_BYTES = 64 << 20  # rows dequantized and written at a time
CONVERT_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                  "bfloat16": torch.bfloat16}

ProgressFn = Callable[[str, int, int], None]  # (tensor just written, bytes so far, total bytes)


class ConvertPlan:
    """What a conversion of ``file`` writes: each HF tensor, from which GGUF tensor, as what."""

    def __init__(self, file: GGUFFile, dtype: str = "auto") -> None:
        self.file = file
        self.architecture = check_architecture(file)
        self.heads = int(file.required("attention.head_count"))
        self.kv_heads = int(file.arch_value("attention.head_count_kv") or self.heads)
        self.sources: dict[str, gguf.ReaderTensor] = {}
        for name, tensor in file.tensors.items():
            target = hf_name(name)
            if target is not None:
                check_type(tensor)
                self.sources[target] = tensor
        if "model.embed_tokens.weight" not in self.sources:
            raise GGUFError(f"{file.path} has no token_embd.weight tensor")
        self.dtype = self._dtype(dtype)
        self.tensors = [Planned(name, self.dtype, hf_shape(t)) for name, t in self.sources.items()]

    def _dtype(self, requested: str) -> torch.dtype:
        if requested != "auto":
            if requested not in CONVERT_DTYPES:
                raise ConfigError(f"dtype {requested!r} is not one of auto, "
                                  f"{', '.join(CONVERT_DTYPES)}")
            return CONVERT_DTYPES[requested]
        matrices = {t.tensor_type for t in self.sources.values() if len(t.shape) == 2}
        if len(matrices) == 1 and (only := matrices.pop()) in FLOAT_TYPES:
            return FLOAT_TYPES[only]
        return torch.float32

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def heads_of(self, name: str) -> int:
        return permuted_heads(self.sources[name].name, self.architecture, self.heads,
                              self.kv_heads)

    def source_record(self) -> dict[str, Any]:
        """``gguf_source.json``: the file, and each tensor's GGUF name, type and reordering."""
        return {
            "format": SOURCE_FORMAT,
            "path": str(self.file.path.resolve()),
            "size": self.file.path.stat().st_size,
            "tensors": {name: {"gguf": t.name, "type": t.tensor_type.name,
                               "permuted_heads": self.heads_of(name)}
                        for name, t in self.sources.items()},
        }


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: ProgressFn | None = None,
                 dtype: str = "auto", force: bool = False,
                 max_file_bytes: int = DEFAULT_FILE_BYTES) -> Path:
    """Convert ``gguf_path`` into the Hugging Face directory ``out_dir`` (returned).

    ``dtype``: ``auto`` (see the module docstring), or float32/float16/bfloat16. ``out_dir``
    must not exist or be empty unless ``force`` replaces it. ``progress`` is called after each
    tensor with its name, the bytes written so far and the total.
    """
    out_dir = Path(out_dir)
    plan = ConvertPlan(GGUFFile(gguf_path), dtype)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ConfigError(f"{out_dir} is not empty",
                          "choose another --out directory, or pass --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    building = out_dir.with_name(f".{out_dir.name}.converting-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        write_model(plan, building, progress, max_file_bytes)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(building, out_dir)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return out_dir


def write_model(plan: ConvertPlan, out_dir: Path, progress: ProgressFn | None,
                max_file_bytes: int = DEFAULT_FILE_BYTES) -> None:
    """Every file of the converted model into the (empty) directory ``out_dir``."""
    dtype_name = str(plan.dtype).removeprefix("torch.")
    tk, tokenizer_config = tokenizer_files(plan.file)
    writer = ShardedWriter(out_dir, plan.tensors, max_file_bytes)
    done = 0
    for planned, sink in writer.write_files():
        source = plan.sources[planned.name]
        rows = planned.shape[0]
        order = row_order(rows, plan.heads_of(planned.name)) if len(planned.shape) == 2 else None
        step = max(1, CHUNK_BYTES // max(1, planned.nbytes // rows))
        for start in range(0, rows if order is not None else 1, step):
            picked = order[start:start + step] if order is not None else slice(None)
            sink.write(read_rows(source, picked))
        done += planned.nbytes
        if progress is not None:
            progress(planned.name, done, plan.total_bytes)
    writer.write_index()
    tk.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "generation_config.json", generation_config(plan.file))
    _write_json(out_dir / GGUF_SOURCE_FILE, plan.source_record())
    _write_json(out_dir / "config.json", hf_config(plan.file, dtype_name))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_source_record(model_dir: Path) -> dict[str, Any] | None:
    """A converted directory's ``gguf_source.json``, or None (not converted from a GGUF)."""
    path = model_dir / GGUF_SOURCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("format") == SOURCE_FORMAT else None
