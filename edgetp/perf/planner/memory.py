"""The exact memory of one rank: its weight files, KV cache, buffers and the loader's blocks.

Nothing is estimated: the tensors come from :mod:`~edgetp.perf.planner.rank_files` (the
splitter's own slicing), the blocks, fixed bytes and work buffers follow the loader's rules
(:class:`~edgetp.parallel.loader.MemoryNeeds`, :func:`~edgetp.parallel.loader.work_bytes`,
:func:`~edgetp.core.pages.aligned_nbytes`), so the figures equal a real split's (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgetp.config.model import ModelConfig
from edgetp.core.limits import PREFILL_CHUNK, master_prefill_chunk
from edgetp.core.pages import aligned_nbytes
from edgetp.parallel.loader import MemoryNeeds, receiving_links, work_bytes
from edgetp.perf.planner.rank_files import Shapes, rank_files, safetensors_size, tensor_bytes
from edgetp.perf.planner.storage import Storage
from edgetp.shard.layout import layer_file
from edgetp.shard.plan import ShardPlan
from edgetp.shard.quant import SCALE_SUFFIX

BLOCK_PREFIXES = ("self_attn.", "mlp.", "lm_head.", "embed_tokens.")  # all else: small tensors

TensorBytes = dict[str, dict[str, int]]  # file name -> tensor -> bytes of data


@dataclass(frozen=True)
class LayerPart:
    """One local layer of a rank: its two blocks and what attention reads per position."""

    index: int
    attn_bytes: int
    mlp_bytes: int
    kv_bytes_per_position: int  # K and V of this rank's KV heads (read every step)
    q_heads: int
    shared: bool


@dataclass(frozen=True)
class RankMemory:
    """What rank ``rank``'s split holds and what its loader will compute, in bytes."""

    rank: int
    weight_bytes: int  # tensor data of its weight files (what its manifest's tensors span)
    file_bytes: int  # those files' sizes on disk (safetensors headers included)
    cache_bytes: int  # the KV cache of max_seq_len positions, for every KV slot
    norm_bytes: int
    needs: MemoryNeeds  # exactly as edgetp.parallel.loader.shard_memory_needs computes it
    block_names: tuple[str, ...]
    layers: tuple[LayerPart, ...]
    head_bytes: int  # lm_head (0 on workers)
    parameters: int  # weights stored (codes count as parameters, scales do not)
    file_sizes: dict[str, int] = field(default_factory=dict)


def prefill_chunk(config: ModelConfig, requested: int = PREFILL_CHUNK) -> int:
    """The prefill chunk a rank's loader counts working memory for: the master's steps, which
    the wire caps."""
    return master_prefill_chunk(requested, config.hidden_size)


def rank_memory(config: ModelConfig, plan: ShardPlan, rank: int, dtype: str | Storage,
                max_seq_len: int | None = None, chunk: int | None = None,
                kv_slots: int = 1) -> RankMemory:
    """Rank ``rank``'s bytes for a split stored as ``dtype`` (see RankMemory), holding the
    keys and values of ``kv_slots`` sequences (serve's --max-batch, a worker's --kv-slots)."""
    storage = Storage.coerce(dtype)
    seq = max_seq_len or config.max_position_embeddings
    files = rank_files(config, plan, rank, storage)
    sizes = _file_sizes(files)
    nbytes = {name: {t: tensor_bytes(*s) for t, s in shapes.items()}
              for name, shapes in files.items()}
    layers = _layer_parts(config, plan, rank, storage, nbytes)
    blocks = [size for part in layers for size in (part.attn_bytes, part.mlp_bytes)]
    names = [f"layers.{part.index}.{block}" for part in layers for block in ("self_attn", "mlp")]
    head = 0
    if rank == 0:
        head = _head_bytes(config, storage, nbytes)
        blocks.append(head)
        names.append("lm_head")
    norms = sum(b for tensors in nbytes.values() for t, b in tensors.items()
                if not t.startswith(BLOCK_PREFIXES))
    cache = sum(part.kv_bytes_per_position for part in layers) * seq * kv_slots
    rope = 2 * seq * config.head_dim * 4  # cos and sin tables, float32
    work = work_bytes(config, seq, rank == 0, chunk or prefill_chunk(config),
                      receiving_links(plan.n_ranks, rank))
    needs = MemoryNeeds(cache + norms + rope + work, tuple(blocks),
                        sizes.get("embed.safetensors", 0))
    weight = sum(sum(tensors.values()) for tensors in nbytes.values())
    return RankMemory(rank, weight, sum(sizes.values()), cache, norms, needs, tuple(names),
                      tuple(layers), head, _parameters(files), sizes)


def _file_sizes(files: dict[str, Shapes]) -> dict[str, int]:
    """Each file's size on disk (shared layers hold one dict of shapes: sized once)."""
    distinct = {id(shapes): shapes for shapes in files.values()}
    size_of = {key: safetensors_size(shapes) for key, shapes in distinct.items()}
    return {name: size_of[id(shapes)] for name, shapes in files.items()}


def _layer_parts(config: ModelConfig, plan: ShardPlan, rank: int, storage: Storage,
                 nbytes: TensorBytes) -> list[LayerPart]:
    """The rank's local layers in order: block bytes as the loader aligns them, heads."""
    share, hd, elem = plan.share(rank), config.head_dim, storage.compute_bytes
    layers = []
    for index in range(config.num_hidden_layers):
        tensors = nbytes.get(layer_file(index))
        if tensors is None:
            continue
        shared = not plan.is_private(index)
        kv_heads = share.n_kv_heads if shared else config.num_key_value_heads
        q_heads = share.n_q_heads if shared else config.num_attention_heads
        layers.append(LayerPart(index, _block_bytes(tensors, ("self_attn.",)),
                                _block_bytes(tensors, ("mlp.",)), 2 * kv_heads * hd * elem,
                                q_heads, shared))
    return layers


def _head_bytes(config: ModelConfig, storage: Storage, nbytes: TensorBytes) -> int:
    """The master's head block: lm_head, or the embedding it is tied to (a float head)."""
    head_file = nbytes["head.safetensors"] if storage.head_quantized else {
        t: b for f in ("head.safetensors", "embed.safetensors") for t, b in nbytes[f].items()}
    head_names = ("lm_head.",) if storage.head_quantized or not config.tie_word_embeddings \
        else ("embed_tokens.",)
    return _block_bytes(head_file, head_names)


def _block_bytes(tensors: dict[str, int], prefixes: tuple[str, ...]) -> int:
    """Bytes a block takes in a buffer: its tensors', each starting aligned."""
    return sum(aligned_nbytes(b) for t, b in tensors.items() if t.startswith(prefixes))


def _parameters(files: dict[str, Shapes]) -> int:
    """Weights stored: an int4 byte holds two codes; scales are not parameters."""
    return sum(math.prod(shape) * (2 if code == "U8" else 1)
               for shapes in files.values() for t, (shape, code) in shapes.items()
               if not t.endswith(SCALE_SUFFIX))
