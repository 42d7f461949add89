"""Synthetic splits: a ready split of seeded random weights, written straight in the stored format.

A 70B model's split (37 GB in int4) without a 140 GB checkpoint to split:
:func:`write_synthetic_split` writes ``OUT/rank-K/`` exactly as :mod:`edgetp.shard.split` would
for a checkpoint of the same shape: the same plan (:func:`~edgetp.shard.plan.make_plan`), file
names, tensors, shapes and dtypes (int4 groups by :func:`~edgetp.shard.quantsplit.int4_groups`),
files written by :func:`~edgetp.shard.split.write_shard_file` (sha256 and per-tensor checksums
in the manifest), rank 0 with ``config.json`` and, when its ids fit, the demo tokenizer. The
fingerprint names the synthetic model (config, seed, dtype), so every rank agrees on it.

Only the bytes differ, and they cost almost nothing to make: no float weight is drawn and then
quantized. Each weight ``[out, in]`` has the standard deviation ``1 / sqrt(in)`` (outputs of unit
scale, whatever the width: a narrow model behaves as a wide one), and the projections that add to
the residual stream (o_proj, down_proj) ``1 / sqrt(2 * layers)`` of that, with an embedding of
std 1 (GPT-2's initialisation): however many layers, the residual stays near rms 1 and every
position keeps its own direction. (Llama's own 0.02 everywhere lets 80 layers of random
attention average the positions into one: every position then predicts the same token.) The
stored values:

- int4: codes uniform in 0..15 (std 4.61 code steps), per group a scale of ``std / 4.61``
  times a jitter in [0.8, 1.2] and a zero of half the scale (the mean code, 7.5, then stands
  for 0);
- int8: codes uniform in -127..127 (std 73.6), per row a scale of ``std / 73.6`` times a jitter;
- float dtypes: uniform with that std (random bytes scaled: normal values cost a hundred times
  more, 12 s for a 70B's embedding).

Norms are ones, biases zeros, the embedding drawn as float weights are, in the float dtype (the
config's ``torch_dtype`` for a quantized split, as the splitter keeps a checkpoint's). Each file
has its own generator seeded by (seed, rank, file), so the same arguments give the same tensors
whatever order the files are written in; two threads write files at once (generating, hashing
and writing overlap: numpy's generators, sha256 and file writes release the GIL). The free
disk space is checked first.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetp.config.model import ModelConfig, parse_hf_config
from edgetp.core.errors import ConfigError, ShardError
from edgetp.core.units import format_bytes
from edgetp.model.synthetic import copy_demo_tokenizer, layer_shapes
from edgetp.shard.layout import layer_file, rank_dir
from edgetp.shard.manifest import FileEntry, Manifest
from edgetp.shard.plan import ShardPlan, TensorSlice, layer_slices, make_plan, master_tensors
from edgetp.shard.quant import (
    INT4_GROUP_SIZES,
    INT8_BLOCK,
    QUANT_DTYPES,
    SCALE_SUFFIX,
    is_quantized_weight,
)
from edgetp.shard.quantsplit import int4_groups, int8_block_names
from edgetp.shard.sources import CONFIG_FILE
from edgetp.shard.split import (
    STORE_DTYPES,
    WEIGHT_DTYPES,
    ProgressFn,
    SplitResult,
    _exclusive,
    _existing_split_matches,
    write_shard_file,
)

INT4_CODE_STD = math.sqrt((16**2 - 1) / 12)  # uniform codes 0..15
INT8_CODE_STD = math.sqrt((255**2 - 1) / 12)  # uniform codes -127..127
INT8_BLOCK_CODE_STD = math.sqrt((256**2 - 1) / 12)  # uniform codes -128..127
BYTE_STD = math.sqrt((256**2 - 1) / 12)  # uniform bytes -128..127 (float weights are drawn so)
JITTER = (0.8, 1.2)  # scales vary by this factor, group to group (row to row for int8)
HEADER_ALLOWANCE = 64 << 10  # bytes per file beyond its tensors (safetensors header), for the
# free-space check; a header is a few KiB
WRITER_THREADS = 2
EMBED_STD = 1.0  # the residual stream starts at rms 1
RESIDUAL_PROJECTIONS = ("o_proj", "down_proj")  # what adds to the residual stream
RESIDUAL_GAIN = 1.0


@dataclass(frozen=True)
class SyntheticFile:
    """One weight file to write: its rank, name, and its weights' unquantized shapes."""

    rank: int
    name: str
    shapes: dict[str, tuple[int, ...]]  # tensor name (as stored) -> [out, in] or [n]
    key: int  # which file of the rank: seeds its generator with the rank and the seed


@dataclass(frozen=True)
class StoredFormat:
    """How the synthetic weights are stored: ``fmt`` (a float dtype, int8 or int4)."""

    fmt: str
    float_dtype: torch.dtype
    group_size: int  # int4's requested group (0 otherwise)
    groups: dict[str, int]  # int4: per tensor name, its group
    layers: int = 1  # the model's decoder layers (the residual projections are scaled by it)
    int8_blocks: dict[str, bool] = field(default_factory=dict)  # int8: blocks, else per row

    def std(self, name: str, shape: tuple[int, ...]) -> float:
        """The standard deviation of weight ``name`` (see the module docstring)."""
        if name == "embed_tokens.weight":
            return EMBED_STD
        if len(shape) != 2:
            return 0.0
        std = 1 / math.sqrt(shape[1])
        if name.rsplit(".", 2)[-2] in RESIDUAL_PROJECTIONS:
            std *= RESIDUAL_GAIN / math.sqrt(2 * self.layers)
        return std

    def quantizes(self, name: str) -> bool:
        return self.fmt in QUANT_DTYPES and is_quantized_weight(name)

    def stored_bytes(self, name: str, shape: tuple[int, ...]) -> int:
        """Bytes of the tensors stored for weight ``name`` of ``shape`` (scales included)."""
        n = math.prod(shape)
        if not self.quantizes(name):
            return n * torch.finfo(self.float_dtype).bits // 8
        if self.fmt == "int8" and self.int8_blocks.get(name, True):
            return n + 4 * n // INT8_BLOCK  # codes, float16 (scale, low) per 32 columns
        if self.fmt == "int8":
            return n + 2 * shape[0]
        return n // 2 + 4 * n // self.groups.get(name, self.group_size)

    def make(self, name: str, shape: tuple[int, ...],
             rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The tensors stored for weight ``name`` of ``shape``, drawn from ``rng``."""
        if not self.quantizes(name):
            return {name: self._float(name, shape, rng)}
        out_features, in_features = shape
        if self.fmt == "int8" and self.int8_blocks.get(name, True):
            codes = _random_bytes(rng, out_features * in_features).view(np.int8)
            scale = (self.std(name, shape) / INT8_BLOCK_CODE_STD
                     * _jitter(rng, (out_features, in_features // INT8_BLOCK)))
            scale_low = torch.stack((scale, scale * -127.5))  # (q + 0.5) * scale: centred
            return {name: torch.from_numpy(codes).view(out_features, in_features),
                    name + SCALE_SUFFIX: scale_low.to(torch.float16)}
        if self.fmt == "int8":
            codes = _random_bytes(rng, out_features * in_features).view(np.int8)
            np.maximum(codes, -127, out=codes)  # the format's codes are symmetric
            scale = self.std(name, shape) / INT8_CODE_STD * _jitter(rng, (out_features,))
            return {name: torch.from_numpy(codes).view(out_features, in_features),
                    name + SCALE_SUFFIX: scale.to(torch.bfloat16)}
        group = self.groups.get(name, self.group_size)
        packed = _random_bytes(rng, out_features * in_features // 2)  # two codes a byte
        scale = (self.std(name, shape) / INT4_CODE_STD
                 * _jitter(rng, (in_features // group, out_features))).to(torch.bfloat16)
        scale_zero = torch.stack((scale, scale / 2), dim=-1)  # [ng, out, 2]: zero = scale / 2
        return {name: torch.from_numpy(packed).view(out_features, in_features // 2),
                name + SCALE_SUFFIX: scale_zero.contiguous()}

    def _float(self, name: str, shape: tuple[int, ...], rng: np.random.Generator) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.float_dtype)
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=self.float_dtype)
        codes = torch.from_numpy(_random_bytes(rng, math.prod(shape)).view(np.int8))
        values = codes.view(shape).to(self.float_dtype)  # uniform: 100x cheaper than normal
        return values.mul_(self.std(name, shape) / BYTE_STD)


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random bytes (uint8): the generator's raw 64-bit output, the cheapest there is."""
    return rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n]


def _jitter(rng: np.random.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(rng.uniform(*JITTER, size=shape).astype(np.float32))


def stored_format(config: ModelConfig, plan: ShardPlan, dtype: str, float_dtype: str,
                  group_size: int = 32) -> StoredFormat:
    """The format of a split stored as ``dtype`` (``float_dtype`` for norms and embedding when
    quantized); a group that cannot divide the slices is a QuantError, as for the splitter."""
    if dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    if dtype != "int4":
        return StoredFormat(dtype, STORE_DTYPES.get(dtype) or STORE_DTYPES[float_dtype], 0, {},
                            config.num_hidden_layers, int8_block_names(config, plan))
    if group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"--group-size {group_size}: choose one of "
                          f"{', '.join(map(str, INT4_GROUP_SIZES))}")
    return StoredFormat(dtype, STORE_DTYPES[float_dtype], group_size,
                        int4_groups(config, plan, group_size), config.num_hidden_layers)


def synthetic_files(config: ModelConfig, plan: ShardPlan, fmt: StoredFormat
                    ) -> Iterator[SyntheticFile]:
    """Every weight file of the split, rank 0's master files last (as the splitter writes)."""
    full = layer_shapes(config)
    slices = [layer_slices(plan, r, config) for r in range(plan.n_ranks)]
    for layer in range(config.num_hidden_layers):
        for rank in range(1 if plan.is_private(layer) else plan.n_ranks):
            parts = slices[rank] if not plan.is_private(layer) else {}
            shapes = {name: parts.get(name, TensorSlice(None)).shape_of(shape)
                      for name, shape in full.items()}
            yield SyntheticFile(rank, layer_file(layer), shapes, layer)
    d, vocab = config.hidden_size, config.vocab_size
    master = {"embed_tokens.weight": (vocab, d), "norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for key, (stem, names) in enumerate(master_tensors(config).items()):
        if stem == "head" and config.tie_word_embeddings and fmt.fmt in QUANT_DTYPES:
            names = [*names, "lm_head.weight"]  # the head is quantized, the embedding not
        yield SyntheticFile(0, f"{stem}.safetensors", {n: master[n] for n in names},
                            config.num_hidden_layers + key)


def split_bytes(files: list[SyntheticFile], fmt: StoredFormat) -> int:
    """What the split takes on disk (a little more: headers are allowed for generously)."""
    return sum(HEADER_ALLOWANCE + sum(fmt.stored_bytes(n, s) for n, s in f.shapes.items())
               for f in files)


def check_free_space(directory: Path, needed: int) -> None:
    """Raise :class:`ShardError` unless ``directory``'s filesystem has ``needed`` bytes free."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ShardError(f"the split needs {format_bytes(needed)} ({needed} bytes) but the disk "
                         f"of {directory} has {format_bytes(free)} ({free} bytes) free; free "
                         "some space, write it elsewhere (--out), or write fewer layers")


def fingerprint(hf_config: dict[str, Any], seed: int, fmt: StoredFormat) -> str:
    """The synthetic model's identity: its config, seed and stored format (32 hex digits)."""
    text = json.dumps({"synthetic": hf_config, "seed": seed, "dtype": fmt.fmt,
                       "group_size": fmt.group_size, "embed_std": EMBED_STD,
                       "residual_gain": RESIDUAL_GAIN}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def write_synthetic_split(hf_config: dict[str, Any], out_dir: str | Path, n_ranks: int,
                          dtype: str = "int4", seed: int = 0, group_size: int = 32,
                          force: bool = False, progress: ProgressFn | None = None,
                          threads: int = WRITER_THREADS) -> SplitResult:
    """Write a split of a random model of ``hf_config`` (a Hugging Face ``config.json`` dict)
    for ``n_ranks`` nodes into ``out_dir`` (see the module docstring). The same split already
    there is reused; a different one is an error unless ``force`` replaces it."""
    out_dir = Path(out_dir)
    config = parse_hf_config(hf_config, source="the synthetic model's config")
    plan = make_plan(config, n_ranks)
    float_dtype = str(hf_config.get("torch_dtype", "bfloat16"))
    fmt = stored_format(config, plan, dtype, float_dtype if float_dtype in STORE_DTYPES
                        else "bfloat16", group_size)
    files = list(synthetic_files(config, plan, fmt))
    print_ = fingerprint(hf_config, seed, fmt)
    dirs = [rank_dir(out_dir, r) for r in range(n_ranks)]
    out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir):
        if _existing_split_matches(out_dir, print_, plan, (dtype, dtype), force, fmt.group_size):
            return SplitResult(out_dir, dirs, True, 0)
        check_free_space(out_dir, split_bytes(files, fmt))
        for directory in dirs:
            directory.mkdir(parents=True, exist_ok=True)
        entries = _write_files(files, fmt, dirs, seed, progress, threads)
        (dirs[0] / CONFIG_FILE).write_text(json.dumps(hf_config, indent=1))
        copy_demo_tokenizer(hf_config, dirs[0])
        for rank, directory in enumerate(dirs):
            Manifest(rank, print_, dtype, config, plan, entries[rank],
                     fmt.group_size).write(directory)
    written = sum(e.size for files_of in entries for e in files_of.values())
    return SplitResult(out_dir, dirs, False, written)


def _write_files(files: list[SyntheticFile], fmt: StoredFormat, dirs: list[Path], seed: int,
                 progress: ProgressFn | None, threads: int) -> list[dict[str, FileEntry]]:
    """Write every file, ``threads`` at a time; each rank's entries in the splitter's order."""
    def write(file: SyntheticFile) -> FileEntry:
        rng = np.random.default_rng([seed, file.rank, file.key])
        tensors: dict[str, torch.Tensor] = {}
        for name, shape in file.shapes.items():
            tensors.update(fmt.make(name, shape, rng))
        return write_shard_file(dirs[file.rank], file.name, tensors)

    entries: list[dict[str, FileEntry]] = [{} for _ in dirs]
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        futures = {pool.submit(write, file): file for file in files}
        try:
            for future in concurrent.futures.as_completed(futures):
                file = futures[future]
                entry = future.result()
                if progress is not None:
                    progress(str(dirs[file.rank] / file.name), entry.size)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        for future, file in futures.items():
            entries[file.rank][file.name] = future.result()
    return entries
