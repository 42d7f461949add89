"""Building one rank's share of the model from its own shard directory alone.

A worker needs nothing but ``rank-K/``: the manifest gives the model config and the plan, the
layer files give its slices. Every file is checked against the manifest (size and sha256)
before its tensors are used, so a corrupted shard is an error naming the file, not wrong output.

With a memory budget smaller than the share, the blocks (attention and MLP slices, the head)
go to a :class:`~edgetp.parallel.window.WeightWindow` that pins what fits and streams the rest;
every block it reads is checked against the manifest's checksums. A split made before the
manifests had checksums still loads, with a warning that re-reads are not checked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from edgetp.config.model import ModelConfig
from edgetp.core.allocator import fix_mmap_threshold, keep_freed_memory
from edgetp.core.errors import ConfigError, ShardError
from edgetp.core.limits import PREFILL_CHUNK, master_prefill_chunk
from edgetp.core.metrics import instrument
from edgetp.core.pages import pack
from edgetp.core.units import format_bytes
from edgetp.kernels import native as kernels
from edgetp.model.checkpoint import set_tensor
from edgetp.model.context import bytes_per_position, default_context
from edgetp.model.llama import Transformer
from edgetp.parallel.blocks import BlockSpec, DiskEmbedding, WindowError
from edgetp.parallel.comm import Communicator
from edgetp.parallel.linears import shard_model
from edgetp.parallel.pinning import choose_pinned
from edgetp.parallel.qlinear import (
    head_quantized,
    is_quantized,
    keeps_stored_dtype,
    mark_streamed,
    quantize_skeleton,
)
from edgetp.parallel.window import DEFAULT_RING_SLOTS, WeightWindow
from edgetp.shard.layout import layer_file
from edgetp.shard.manifest import Manifest, read_manifest, verify_directory

log = logging.getLogger("edgetp.parallel.loader")

BLOCK_PREFIXES = {"self_attn.": "self_attn", "mlp.": "mlp"}
STORED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_rank(
    shard_dir: str | Path,
    comm: Communicator,
    dtype: torch.dtype = torch.float32,
    max_seq_len: int | None = None,
    verify: bool = True,
    memory_budget: int | None = None,
    ring_slots: int = DEFAULT_RING_SLOTS,
    prefill_chunk: int = PREFILL_CHUNK,
    kv_slots: int = 1,
) -> Transformer:
    """Rank ``manifest.rank``'s share, ready to run with ``comm``; KV cache allocated (slot 0;
    the others on first use).

    ``memory_budget`` (bytes) covers weights, the KV cache of ``kv_slots`` sequences and
    working buffers; when the share does not fit, blocks stream from disk through the window
    (``model.window``). With a budget, malloc's mmap threshold is fixed first
    (:mod:`edgetp.core.allocator`): freed activations go back to the kernel instead of growing
    the heap outside the budget; without one, they stay in the heap for the next layer's.
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    if comm.rank != manifest.rank:
        raise ShardError(
            f"{shard_dir} holds rank {manifest.rank}'s shard but this node is rank {comm.rank}"
        )
    verify_directory(shard_dir, manifest, check_hash=verify)
    if memory_budget is not None:
        fix_mmap_threshold()
    else:
        keep_freed_memory()
    kernels.library()  # build the decode kernels now, while no weights share the memory limit
    max_seq_len = rank_context(manifest, dtype, max_seq_len)
    model, blocks = _skeleton(manifest, shard_dir, comm, dtype, max_seq_len)
    if memory_budget is not None:
        needs = _memory_needs(model, manifest, blocks, dtype, prefill_chunk, kv_slots)
        if needs.total > memory_budget:
            _check_window_dtype(manifest, dtype)
            _load_small_tensors(model, manifest, shard_dir, blocks, dtype)
            window = _make_window(blocks, needs, memory_budget, ring_slots)
            _warn_if_unchecked(shard_dir, manifest)
            mark_streamed(window.streamed)
            model.window = window
            instrument(model)
            return model.eval()
    _load_everything(model, manifest, shard_dir, dtype)
    instrument(model)
    return model.eval()


@dataclass(frozen=True)
class MemoryNeeds:
    """What a rank's share needs in memory, in bytes."""

    fixed: int  # KV cache, norms, RoPE tables, working buffers
    blocks: tuple[int, ...]  # each streamable block, in execution order
    embedding: int  # resident only when nothing streams

    @property
    def total(self) -> int:
        """Everything resident (the budget at which nothing streams)."""
        return self.fixed + sum(self.blocks) + self.embedding

    def minimum(self, ring_slots: int = DEFAULT_RING_SLOTS) -> int:
        """The smallest budget that works: everything fixed plus a ring of the largest block."""
        return self.fixed + ring_slots * max(self.blocks)


def shard_memory_needs(shard_dir: str | Path, dtype: torch.dtype = torch.float32,
                       max_seq_len: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
                       kv_slots: int = 1) -> MemoryNeeds:
    """A rank's memory needs, computed from its manifest without loading any weight."""
    from edgetp.parallel.comm import SoloCommunicator

    manifest = read_manifest(shard_dir)
    comm = SoloCommunicator()
    comm.rank, comm.world_size = manifest.rank, manifest.plan.n_ranks  # type: ignore[misc]
    max_seq_len = rank_context(manifest, dtype, max_seq_len, announce=False)
    model, blocks = _skeleton(manifest, Path(shard_dir), comm, dtype, max_seq_len, cache=False)
    return _memory_needs(model, manifest, blocks, dtype, prefill_chunk, kv_slots)


def rank_context(manifest: Manifest, dtype: torch.dtype, requested: int | None,
                 announce: bool = True) -> int:
    """``requested``, or the context that fits this node's memory for the layers and KV heads
    its rank holds (:func:`~edgetp.model.context.default_context`)."""
    if requested is not None:
        return requested
    plan, config = manifest.plan, manifest.model_config
    share = plan.share(manifest.rank)
    whole = (config.num_key_value_heads, config.num_attention_heads)
    heads = [(share.n_kv_heads, share.n_q_heads) if not plan.is_private(layer)
             else whole if manifest.rank == 0 else (0, 0)
             for layer in range(config.num_hidden_layers)]
    return default_context(config, bytes_per_position(config, heads, dtype.itemsize),
                           where=f"rank {manifest.rank}", announce=announce)


def _skeleton(manifest: Manifest, shard_dir: Path, comm: Communicator, dtype: torch.dtype,
              max_seq_len: int | None, cache: bool = True) -> tuple[Transformer, list[BlockSpec]]:
    """The rank's model with no weights yet (``meta``), its KV cache, and its blocks."""
    with torch.device("meta"):
        model = Transformer(manifest.model_config, max_seq_len=max_seq_len)
    shard_model(model, manifest.plan, manifest.rank, comm)
    quantize_skeleton(model, manifest, comm)  # int8/int4 shards: quantized linears
    model.window = None
    if cache:
        model.allocate_cache(dtype)
    return model, _blocks(model, manifest, shard_dir)


def _memory_needs(model: Transformer, manifest: Manifest, blocks: list[BlockSpec],
                  dtype: torch.dtype, prefill_chunk: int, kv_slots: int = 1) -> MemoryNeeds:
    element = dtype.itemsize  # the KV cache is allocated in the compute dtype
    cache = sum(2 * layer.self_attn.n_kv_heads * model.max_seq_len * layer.self_attn.head_dim
                for layer in model.local_layers()) * element * kv_slots
    chunk = master_prefill_chunk(prefill_chunk, model.config.hidden_size)  # what steps carry
    work = work_bytes(model.config, model.max_seq_len, model.lm_head is not None, chunk,
                      receiving_links(manifest.plan.n_ranks, manifest.rank))
    fixed = cache + _small_bytes(model, manifest, blocks) + work
    return MemoryNeeds(fixed, tuple(b.nbytes for b in blocks), _embedding_bytes(manifest))


def _load_everything(model: Transformer, manifest: Manifest, shard_dir: Path,
                     dtype: torch.dtype) -> None:
    """Every tensor of the rank's files, each file's copied into memory of its own backed by
    huge pages (:mod:`edgetp.core.pages`), not left as views of the file's mapping."""
    for file_name, prefix in _files_with_prefixes(manifest):
        with safe_open(shard_dir / file_name, framework="pt") as handle:
            names = list(manifest.files[file_name].tensors)
            stored = [handle.get_tensor(name) for name in names]
            loaded = pack([tensor if keeps_stored_dtype(name, tensor) else tensor.to(dtype)
                           for name, tensor in zip(names, stored, strict=True)])
            del stored  # the file's mapping goes with the last view
            for name, tensor in zip(names, loaded, strict=True):
                set_tensor(model, prefix + name, tensor, f" in {shard_dir / file_name}")
    if (manifest.rank == 0 and manifest.model_config.tie_word_embeddings
            and not head_quantized(manifest)):
        model.tie_head_to_embedding()


def _files_with_prefixes(manifest: Manifest) -> list[tuple[str, str]]:
    out = []
    for index in range(manifest.model_config.num_hidden_layers):
        if manifest.rank == 0 or not manifest.plan.is_private(index):
            out.append((layer_file(index), f"layers.{index}."))
    if manifest.rank == 0:
        out += [("embed.safetensors", ""), ("head.safetensors", "")]
    return out


def _blocks(model: Transformer, manifest: Manifest, shard_dir: Path) -> list[BlockSpec]:
    """Every streamable block of this rank, in execution order."""
    blocks = []
    for file_name, prefix in _files_with_prefixes(manifest):
        if not prefix:
            continue
        layer = model.get_submodule(prefix.rstrip("."))
        tensors = manifest.files[file_name].tensors
        for tensor_prefix, module_name in BLOCK_PREFIXES.items():
            part = {n[len(tensor_prefix):]: e for n, e in tensors.items()
                    if n.startswith(tensor_prefix)}
            blocks.append(BlockSpec(prefix + module_name, layer.get_submodule(module_name),
                                    shard_dir / file_name, part))
    if manifest.rank == 0:
        blocks.append(_head_block(model, manifest, shard_dir))
    return blocks


def _head_block(model: Transformer, manifest: Manifest, shard_dir: Path) -> BlockSpec:
    if head_quantized(manifest):  # quantized head (and scales), even with tied embeddings
        return BlockSpec("lm_head", model.lm_head, shard_dir / "head.safetensors",
                         {n.removeprefix("lm_head."): e for n, e in
                          manifest.files["head.safetensors"].tensors.items()
                          if n.startswith("lm_head.")})
    if manifest.model_config.tie_word_embeddings:
        entry = manifest.files["embed.safetensors"].tensors["embed_tokens.weight"]
        path = shard_dir / "embed.safetensors"
    else:
        entry = manifest.files["head.safetensors"].tensors["lm_head.weight"]
        path = shard_dir / "head.safetensors"
    return BlockSpec("lm_head", model.lm_head, path, {"weight": entry})


def _load_small_tensors(model: Transformer, manifest: Manifest, shard_dir: Path,
                        blocks: list[BlockSpec], dtype: torch.dtype) -> None:
    """Norms stay resident; block tensors become empty placeholders; the embedding stays on disk."""
    for block in blocks:
        for name in block.tensors:
            owner, _, attr = name.rpartition(".")
            module = block.module.get_submodule(owner) if owner else block.module
            module.register_parameter(attr, nn.Parameter(torch.empty(0), requires_grad=False))
    in_blocks = {(str(b.path.name), n) for b in blocks for n in _disk_names(b)}
    for file_name, prefix in _files_with_prefixes(manifest):
        with safe_open(shard_dir / file_name, framework="pt") as handle:
            for name, entry in manifest.files[file_name].tensors.items():
                if (file_name, name) in in_blocks:
                    continue
                if name == "embed_tokens.weight":
                    model.embed_tokens = DiskEmbedding(shard_dir / file_name, entry, dtype)
                    continue
                set_tensor(model, prefix + name, pack([handle.get_tensor(name).to(dtype)])[0])


def _disk_names(block: BlockSpec) -> list[str]:
    if block.name == "lm_head":
        return [f"lm_head.{n}" for n in block.tensors]
    module_name = block.name.rsplit(".", 1)[1]
    return [f"{module_name}.{n}" for n in block.tensors]


def _check_window_dtype(manifest: Manifest, dtype: torch.dtype) -> None:
    """Float blocks stream into compute buffers as stored (codes and scales whatever the
    dtype): the float layers, or in a quantized split a float head."""
    floats = manifest.head_format if is_quantized(manifest) else manifest.dtype
    if floats not in STORED_DTYPES:
        return
    if STORED_DTYPES[floats] != dtype:
        raise ConfigError(
            f"with --memory-budget, weights stream from disk straight into compute buffers, so "
            f"the compute dtype ({str(dtype).removeprefix('torch.')}) must equal the stored "
            f"dtype ({floats}); pass --dtype {floats} or re-split with --dtype"
        )


def _small_bytes(model: Transformer, manifest: Manifest, blocks: list[BlockSpec]) -> int:
    """Resident bytes outside the blocks: norms and RoPE tables (the embedding stays on disk)."""
    in_blocks = {(b.path.name, n) for b in blocks for n in _disk_names(b)}
    norms = sum(e.offsets[1] - e.offsets[0] for f, entry in manifest.files.items()
                for n, e in entry.tensors.items()
                if (f, n) not in in_blocks and n != "embed_tokens.weight")
    return norms + sum(b.numel() * b.element_size() for b in model.buffers())


def _embedding_bytes(manifest: Manifest) -> int:
    entry = manifest.files.get("embed.safetensors")
    return 0 if entry is None else entry.size


def work_bytes(config: ModelConfig, max_seq_len: int, with_head: bool, prefill_chunk: int,
               links: int = 0) -> int:
    """Activations of one prefill chunk: a generous bound of a few [T, width] float32 tensors
    (``with_head``: the rank computes the head's [T, vocab] logits too), and the two [T, d]
    float32 receive buffers each of its ``links`` data links keeps
    (:class:`~edgetp.net.datalink.ReusedBuffers`). The planner asks this as the loader does."""
    width = config.hidden_size * 4 + config.intermediate_size + config.num_attention_heads * (
        max_seq_len)
    head = config.vocab_size if with_head else 0
    received = 2 * links * config.hidden_size
    return 4 * prefill_chunk * (width + head + received) + (1 << 20)


def receiving_links(n_ranks: int, rank: int) -> int:
    """The data links a rank receives allreduce messages on: the star's master one per worker
    (every partial), a worker one (the sums)."""
    return n_ranks - 1 if rank == 0 else min(1, n_ranks - 1)


def _warn_if_unchecked(shard_dir: Path, manifest: Manifest) -> None:
    """Say so when the manifest has no checksums to check what the window re-reads against."""
    if any(not entry.xxh3 for file in manifest.files.values() for entry in file.tensors.values()):
        log.warning("%s was split by an older edgetp: its manifest has no checksums, so the "
                    "weights streamed from disk are not checked; split the model again to have "
                    "them checked", shard_dir)


def _make_window(blocks: list[BlockSpec], needs: MemoryNeeds, budget: int,
                 ring_slots: int) -> WeightWindow:
    fixed, sizes, minimum = needs.fixed, needs.blocks, needs.minimum(ring_slots)
    if budget < minimum:
        raise WindowError(
            f"a memory budget of {format_bytes(budget)} cannot hold this shard's minimum of "
            f"{format_bytes(minimum)} (KV cache and working buffers {format_bytes(fixed)} plus "
            f"{ring_slots} buffers of the largest block, {format_bytes(max(sizes))}); raise "
            "--memory-budget, lower --max-seq-len, or split over more nodes"
        )
    return WeightWindow(blocks, choose_pinned(sizes, budget - fixed, ring_slots), ring_slots)
