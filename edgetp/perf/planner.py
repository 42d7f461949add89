"""The planner: memory and latency of a model on a cluster, predicted before anything runs.

Memory is not estimated but derived: the tensors each rank's split would hold come from the
same :func:`~edgetp.shard.plan.make_plan` / :func:`~edgetp.shard.plan.layer_slices` the splitter uses, the
window's blocks and fixed bytes follow the loader's rules (:class:`~edgetp.parallel.loader.MemoryNeeds`,
its ``work_bytes``), and pinning is the window's own :func:`~edgetp.parallel.pinning.choose_pinned`. So
the weight bytes, KV cache bytes and block sizes equal those of a real split exactly (tested).

Time is a model over device profiles (:mod:`edgetp.perf.probe`) and the link. Per token, each rank
reads its weights once (``bytes / matvec bandwidth`` plus per-layer overhead, KV reads at
memory bandwidth); every shared layer costs the slowest rank's attention and MLP plus two star
allreduces (gather: ``latency + k (overhead + bytes / bandwidth)`` with k = N-1 messages through
the master's link, then the same for the sum coming back; the step's last one is a reduce);
a step starts with one broadcast. Streamed blocks are read from disk by a thread that never
waits for compute, so a node's disk time overlaps its compute and the communication:
``token = max(compute + communication, max over nodes of streamed bytes / disk bandwidth)``.
Prefill is the same per chunk of the master's prefill size; a T-token product costs
``bytes / matvec bandwidth + 2 (T - 1) params / matmul rate`` (the probe measures that rate
as the time a 128-token product adds over a 1-token one).

The cluster file is the one ``edgetp launch`` reads (:mod:`edgetp.config.cluster`), with a
``profile`` per node (a JSON file from ``edgetp probe`` or inline figures) and a link per node
or for all; for planning alone, ``address`` and ``shard_dir`` may be left out and
``count: 8`` stands for eight identical nodes::

    link: tpi-llm            # a link profile for all nodes (or {latency_ms, bandwidth_mbit})
    wire_dtype: f32          # optional (f32 | bf16 | int8), as `--wire-dtype`
    allreduce: star          # optional (star | ring), as `--allreduce`
    nodes:                   # the first node is the master (rank 0)
      - {name: desktop, profile: desktop.json, memory_budget: 12GiB, share: 2}
      - {name: pi, count: 2, memory_budget: 3GiB, profile: {mem_bw_gbs: 8, disk_bw_mbs: 300}}

A link profile shapes what its node sends (as the link emulation does): a gather to the master
waits for the slowest worker's latency, a broadcast for the master's, and every message of a
traversal crosses the master's link, at the slower of the two ends' bandwidth.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from edgetp.config.cluster import ClusterConfig, load_cluster_config
from edgetp.config.links import LinkProfile
from edgetp.config.model import ModelConfig
from edgetp.core.errors import ConfigError
from edgetp.core.units import format_bytes
from edgetp.parallel.blocks import aligned_nbytes
from edgetp.parallel.loader import MemoryNeeds, work_bytes
from edgetp.parallel.pinning import choose_pinned
from edgetp.parallel.window import DEFAULT_RING_SLOTS
from edgetp.perf.probe import DeviceProfile, load_profile
from edgetp.runtime.master import MAX_STEP_BYTES
from edgetp.shard.layout import layer_file
from edgetp.shard.plan import ShardPlan, TensorSlice, layer_slices, make_plan, master_tensors
from edgetp.shard.quant import QUANT_DTYPES, SCALE_SUFFIX, QuantError, is_quantized_weight
from edgetp.shard.quantsplit import int4_groups

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FLOAT_DTYPES = tuple(ELEMENT_BYTES)
WEIGHT_DTYPES = (*FLOAT_DTYPES, *QUANT_DTYPES)  # as `edgetp split --dtype`
SAFETENSORS_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
CODE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1}
PARAMETERS_PER_BYTE = {"float32": 0.25, "bfloat16": 0.5, "float16": 0.5, "int8": 1.0, "int4": 2.0}
WIRE_BYTES = {"f32": 4, "bf16": 2, "int8": 1}  # int8 adds a float32 scale per row
WORKER_PREFILL_CHUNK = 128  # load_rank's default, which workers use
MIN_GAIN = 0.02  # unequal shares must beat equal shares by this fraction to be proposed


# -- the cluster ----------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeSpec:
    name: str
    profile: DeviceProfile
    memory_budget: int | None  # bytes for weights, KV cache and buffers; None: no limit
    share: float = 1.0
    link: LinkProfile | None = None  # what this node's sends cross; None: an ideal link

    @property
    def latency_s(self) -> float:
        return 0.0 if self.link is None else self.link.latency_ms * 1e-3

    @property
    def bits_per_s(self) -> float:
        rate = None if self.link is None else self.link.bandwidth_mbit
        return math.inf if rate is None else rate * 1e6


@dataclass(frozen=True)
class ClusterSpec:
    nodes: tuple[NodeSpec, ...]
    wire_dtype: str = "f32"
    private_layers: int = 0
    ring_slots: int = DEFAULT_RING_SLOTS
    allreduce: str = "star"  # or "ring" (edgetp.net.ring)
    data_link: bool = True  # partials and sums over edgetp.net.datalink (not with CURVE)

    @property
    def shares(self) -> tuple[float, ...]:
        return tuple(n.share for n in self.nodes)

    @property
    def latency_ms(self) -> float:
        """The slowest link's one-way latency."""
        return max(n.latency_s for n in self.nodes) * 1e3

    @property
    def bandwidth_mbit(self) -> float:
        """The narrowest link's bandwidth (inf: unlimited)."""
        return min(n.bits_per_s for n in self.nodes) / 1e6

    def link_summary(self) -> str:
        links = {n.link for n in self.nodes[1:] or self.nodes}
        if len(links) == 1 and (link := links.pop()) is not None:
            return f"link {link.name} ({_link_figures(link)})"
        if links == {None}:
            return "ideal links"
        return "links " + ", ".join(f"{n.name}: {_link_figures(n.link)}" for n in self.nodes)

    def with_shares(self, shares: tuple[float, ...]) -> ClusterSpec:
        nodes = tuple(replace(n, share=float(s)) for n, s in zip(self.nodes, shares, strict=True))
        return replace(self, nodes=nodes)


def _link_figures(link: LinkProfile | None) -> str:
    if link is None:
        return "ideal"
    rate = "unlimited" if link.bandwidth_mbit is None else f"{link.bandwidth_mbit:g} Mbit/s"
    return f"{link.latency_ms:g} ms one way, {rate}"


def load_cluster(path: str | Path) -> ClusterSpec:
    """The cluster file (:mod:`edgetp.config.cluster`'s format) as the planner needs it."""
    return cluster_spec(load_cluster_config(path, planning=True))


def cluster_spec(config: ClusterConfig) -> ClusterSpec:
    """Every node's profile, budget, share and link; a missing profile or link is an error."""
    profiles: dict[str, DeviceProfile] = {}
    nodes = []
    for node in config.nodes:
        where = f"{config.source}: node {node.name}"
        profile = _node_profile(node.profile, config, where, profiles)
        link = config.link_profile(node)
        if link is None and len(config.nodes) > 1:
            raise ConfigError(f"{where} has no link: give it link: PROFILE (e.g. "
                              "home-wifi, gigabit, tpi-llm, or one under link_profiles), or "
                              "link: {latency_ms: 1, bandwidth_mbit: 300} at the top for all")
        budget = node.memory_budget
        if budget is None and profile.free_memory is not None:
            budget = max(0, profile.free_memory - profile.runtime_rss)
        nodes.append(NodeSpec(node.name, profile, budget, node.share, link))
    return ClusterSpec(tuple(nodes), config.wire_dtype, config.private_layers,
                       allreduce=config.allreduce, data_link=not config.security.curve)


def _node_profile(raw: str | dict[str, Any] | None, config: ClusterConfig, where: str,
                  loaded: dict[str, DeviceProfile]) -> DeviceProfile:
    if raw is None:
        raise ConfigError(f"{where} has no profile: run `edgetp probe --out NAME.json` on that "
                          "device and add profile: NAME.json, or give figures inline "
                          "(profile: {mem_bw_gbs: 8, disk_bw_mbs: 300})")
    if isinstance(raw, dict):
        return DeviceProfile.from_dict(raw, f"{where}: profile")
    if raw not in loaded:
        loaded[raw] = load_profile(config.local_path(raw))
    return loaded[raw]


# -- exact memory of one rank -------------------------------------------------------------------

@dataclass(frozen=True)
class Storage:
    """How a split stores its tensors and a run computes with them.

    ``weights`` is ``edgetp split --dtype``: a float dtype, or int8/int4 for the linear
    weights; ``floats`` the dtype of everything else (norms, embedding, biases: a quantized
    split keeps the checkpoint's); ``compute`` the run's ``--dtype`` (activations, KV cache);
    ``group_size`` int4's requested group.
    """

    weights: str = "float32"
    floats: str = "float32"
    compute: str = "float32"
    group_size: int = 32

    @classmethod
    def of(cls, dtype: str, float_dtype: str | None = None, compute_dtype: str | None = None,
           group_size: int = 32) -> Storage:
        if dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"--dtype {dtype!r}: plan one of {', '.join(WEIGHT_DTYPES)}")
        quantized = dtype in QUANT_DTYPES
        floats = (float_dtype or "bfloat16") if quantized else dtype  # a float split: all dtype
        compute = compute_dtype or ("float32" if quantized else dtype)
        for what, value in (("float dtype", floats), ("compute dtype", compute)):
            if value not in FLOAT_DTYPES:
                raise ConfigError(f"{what} {value!r}: one of {', '.join(FLOAT_DTYPES)}")
        return cls(dtype, floats, compute, group_size)

    @classmethod
    def coerce(cls, dtype: str | Storage) -> Storage:
        """``dtype`` as given, or the storage of a split in ``dtype`` with the defaults."""
        return dtype if isinstance(dtype, Storage) else cls.of(dtype)

    @property
    def quantized(self) -> bool:
        return self.weights in QUANT_DTYPES

    @property
    def compute_bytes(self) -> int:
        return ELEMENT_BYTES[self.compute]

    @property
    def kernel_dtype(self) -> str:
        """The dtype whose figures time the matrix products (quantized: bfloat16 kernels)."""
        return "bfloat16" if self.quantized else self.compute


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
    cache_bytes: int  # the KV cache preallocated for max_seq_len
    norm_bytes: int
    needs: MemoryNeeds  # exactly as edgetp.parallel.loader.shard_memory_needs computes it
    block_names: tuple[str, ...]
    layers: tuple[LayerPart, ...]
    head_bytes: int  # lm_head (0 on workers)
    parameters: int  # weights stored (codes count as parameters, scales do not)
    file_sizes: dict[str, int] = field(default_factory=dict)


Shapes = dict[str, tuple[tuple[int, ...], str]]  # tensor -> (shape, safetensors dtype code)


def rank_files(config: ModelConfig, plan: ShardPlan, rank: int,
               storage: Storage = Storage()) -> dict[str, Shapes]:
    """File name -> tensor -> (shape, dtype code), for every weight file ``split`` writes."""
    d, hd, inner = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    full = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (q, d), "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.weight": (kv, d), "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.weight": (kv, d), "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.weight": (d, q), "self_attn.o_proj.bias": (d,),
            "mlp.gate_proj.weight": (inner, d), "mlp.gate_proj.bias": (inner,),
            "mlp.up_proj.weight": (inner, d), "mlp.up_proj.bias": (inner,),
            "mlp.down_proj.weight": (d, inner), "mlp.down_proj.bias": (d,),
            "embed_tokens.weight": (config.vocab_size, d), "norm.weight": (d,),
            "lm_head.weight": (config.vocab_size, d)}
    groups = int4_groups(config, plan, storage.group_size) if storage.weights == "int4" else {}
    parts = layer_slices(plan, rank, config)
    sliced = _stored({name: _slice_shape(full[name], part) for name, part in parts.items()},
                     storage, groups)
    whole = _stored({name: full[name] for name in parts}, storage, groups)
    files: dict[str, Shapes] = {}
    for layer in range(config.num_hidden_layers):
        if not plan.is_private(layer):
            files[layer_file(layer)] = sliced
        elif rank == 0:
            files[layer_file(layer)] = whole
    if rank == 0:
        for stem, names in master_tensors(config).items():
            if stem == "head" and storage.quantized and "lm_head.weight" not in names:
                names = [*names, "lm_head.weight"]  # a quantized split stores a tied head too
            files[f"{stem}.safetensors"] = _stored({n: full[n] for n in names}, storage, groups)
    return files


def _stored(shapes: dict[str, tuple[int, ...]], storage: Storage,
            groups: dict[str, int]) -> Shapes:
    """Logical shapes -> what the splitter writes (edgetp.shard.quant's formats for int8/int4)."""
    out: Shapes = {}
    float_code = SAFETENSORS_CODES[storage.floats]
    for name, shape in shapes.items():
        if not (storage.quantized and is_quantized_weight(name)):
            out[name] = (shape, float_code)
        elif storage.weights == "int8":  # I8 [out, in], BF16 scale [out]
            out[name] = (shape, "I8")
            out[name + SCALE_SUFFIX] = ((shape[0],), "BF16")
        else:  # U8 [out, in / 2], BF16 (scale, zero) [in / group, out, 2]
            out[name] = ((shape[0], shape[1] // 2), "U8")
            out[name + SCALE_SUFFIX] = ((shape[1] // groups[name], shape[0], 2), "BF16")
    return out


def _slice_shape(shape: tuple[int, ...], part: TensorSlice) -> tuple[int, ...]:
    if part.dim is None:
        return shape
    out = list(shape)
    out[part.dim] = part.stop - part.start
    return tuple(out)


def _nbytes(shape: tuple[int, ...], code: str) -> int:
    return math.prod(shape) * CODE_BYTES[code]


def safetensors_size(shapes: Shapes) -> int:
    """The size of the file ``save_file`` writes for these tensors and edgetp's metadata:
    8-byte length, JSON header padded to 8 bytes, data by element size (largest first), then
    by name (the offsets' digits count in the header)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "producer": "edgetp"}}
    offset = 0
    for name in sorted(shapes, key=lambda n: (-CODE_BYTES[shapes[n][1]], n)):
        shape, code = shapes[name]
        nbytes = _nbytes(shape, code)
        header[name] = {"dtype": code, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    length = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + length + (-length % 8) + offset


def prefill_chunk(config: ModelConfig, rank: int, requested: int = 128) -> int:
    """The prefill chunk the rank's loader is given (the master caps it by MAX_STEP_BYTES)."""
    if rank != 0:
        return WORKER_PREFILL_CHUNK
    return max(1, min(requested, MAX_STEP_BYTES // (4 * config.hidden_size)))


def rank_memory(config: ModelConfig, plan: ShardPlan, rank: int, dtype: str | Storage,
                max_seq_len: int | None = None, chunk: int | None = None) -> RankMemory:
    """Rank ``rank``'s bytes for a split stored as ``dtype`` (see RankMemory)."""
    storage = Storage.coerce(dtype)
    seq = max_seq_len or config.max_position_embeddings
    files = rank_files(config, plan, rank, storage)
    distinct = {id(shapes): shapes for shapes in files.values()}  # shared layers: one dict
    size_of = {key: safetensors_size(shapes) for key, shapes in distinct.items()}
    sizes = {name: size_of[id(shapes)] for name, shapes in files.items()}
    nbytes = {name: {t: _nbytes(*s) for t, s in shapes.items()} for name, shapes in files.items()}
    share, hd, elem = plan.share(rank), config.head_dim, storage.compute_bytes
    layers, blocks, names = [], [], []
    for index in range(config.num_hidden_layers):
        tensors = nbytes.get(layer_file(index))
        if tensors is None:
            continue
        shared = not plan.is_private(index)
        attn = sum(aligned_nbytes(b) for t, b in tensors.items() if t.startswith("self_attn."))
        mlp = sum(aligned_nbytes(b) for t, b in tensors.items() if t.startswith("mlp."))
        kv_heads = share.n_kv_heads if shared else config.num_key_value_heads
        q_heads = share.n_q_heads if shared else config.num_attention_heads
        layers.append(LayerPart(index, attn, mlp, 2 * kv_heads * hd * elem, q_heads, shared))
        blocks += [attn, mlp]
        names += [f"layers.{index}.self_attn", f"layers.{index}.mlp"]
    head = 0
    if rank == 0:
        head_file = nbytes["head.safetensors"] if storage.quantized else {
            t: b for f in ("head.safetensors", "embed.safetensors")
            for t, b in nbytes[f].items()}
        head_names = ("lm_head.",) if storage.quantized or not config.tie_word_embeddings \
            else ("embed_tokens.",)
        head = sum(aligned_nbytes(b) for t, b in head_file.items() if t.startswith(head_names))
        blocks.append(head)
        names.append("lm_head")
    in_blocks = ("self_attn.", "mlp.", "lm_head.", "embed_tokens.")
    norms = sum(b for tensors in nbytes.values() for t, b in tensors.items()
                if not t.startswith(in_blocks))
    cache = sum(part.kv_bytes_per_position for part in layers) * seq
    rope = 2 * seq * hd * 4  # cos and sin tables, float32
    fake_model = SimpleNamespace(config=config, max_seq_len=seq,
                                 lm_head=object() if rank == 0 else None)
    work = work_bytes(fake_model, chunk or prefill_chunk(config, rank))  # type: ignore[arg-type]
    needs = MemoryNeeds(cache + norms + rope + work, tuple(blocks),
                        sizes.get("embed.safetensors", 0))
    weight = sum(sum(tensors.values()) for tensors in nbytes.values())
    parameters = sum(math.prod(shape) * (2 if code == "U8" else 1)
                     for shapes in files.values() for t, (shape, code) in shapes.items()
                     if not t.endswith(SCALE_SUFFIX))
    return RankMemory(rank, weight, sum(sizes.values()), cache, norms, needs, tuple(names),
                      tuple(layers), head, parameters, sizes)


# -- one node: what stays in memory, what streams -----------------------------------------------

@dataclass(frozen=True)
class NodePlan:
    name: str
    rank: int
    q_heads: int
    kv_heads: int
    mlp_columns: int
    memory: RankMemory
    budget: int | None
    pinned: tuple[bool, ...]  # per block, in execution order (all True: nothing streams)
    resident_bytes: int  # weights, KV cache and buffers held: what the budget must cover
    streamed_bytes: int  # read from disk every step
    peak_rss: int  # the process's predicted high-water mark, runtime included
    minimum_budget: int  # the smallest budget the loader accepts
    shortfall: int  # > 0: the budget is this much below the minimum

    @property
    def streams(self) -> bool:
        return self.streamed_bytes > 0


def node_plan(node: NodeSpec, rank: int, plan: ShardPlan, memory: RankMemory,
              ring_slots: int) -> NodePlan:
    """Mirror ``load_rank``: everything resident when it fits the budget, else the window."""
    needs, share = memory.needs, plan.share(rank)
    minimum = needs.minimum(ring_slots)
    budget = node.memory_budget
    pinned = (True,) * len(needs.blocks)
    resident = needs.fixed - memory.norm_bytes + memory.weight_bytes
    transient = max(memory.file_sizes.values())  # a file is mapped while its tensors load
    shortfall = 0
    if budget is not None and needs.total > budget:
        if budget < minimum:
            shortfall = minimum - budget
        else:
            pinned = tuple(choose_pinned(needs.blocks, budget - needs.fixed, ring_slots))
            streamed = [b for b, p in zip(needs.blocks, pinned, strict=True) if not p]
            ring = ring_slots * max(streamed) if streamed else 0
            resident = needs.fixed + sum(b for b, p in zip(needs.blocks, pinned,
                                                           strict=True) if p) + ring
            transient = 0  # pinned blocks are read with pread, not mapped
    streamed_bytes = sum(b for b, p in zip(needs.blocks, pinned, strict=True) if not p)
    return NodePlan(node.name, rank, share.n_q_heads, share.n_kv_heads, share.n_mlp_columns,
                    memory, budget, pinned, resident, streamed_bytes,
                    node.profile.runtime_rss + resident + transient, minimum, shortfall)


# -- time --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepTime:
    """Seconds of one step (a decode token or a prefill chunk) on the critical path."""

    compute_s: float  # the slowest rank per block, the master's private layers, head, overhead
    comm_s: float  # the step broadcast and the allreduces
    disk_s: float  # the slowest node's streaming (overlaps compute and communication)
    node_compute_s: tuple[float, ...]  # each rank's own compute (no waiting)
    node_disk_s: tuple[float, ...]

    @property
    def total_s(self) -> float:
        return max(self.compute_s + self.comm_s, self.disk_s)


def step_time(cluster: ClusterSpec, nodes: list[NodePlan], config: ModelConfig,
              storage: Storage, tokens: int, start: int, with_head: bool = True) -> StepTime:
    """The critical path of one step of ``tokens`` tokens at positions ``start``.."""
    n = len(nodes)
    per_rank = [_layer_times(node, cluster.nodes[i].profile, storage, tokens, start, config)
                for i, node in enumerate(nodes)]
    master = cluster.nodes[0].profile
    compute = master.step_overhead_us * 1e-6 if with_head else 0.0
    shared = [part.index for part in nodes[0].memory.layers if part.shared]
    for index, (attn, mlp) in per_rank[0].items():
        if index not in shared:
            compute += attn + mlp  # the master's private layers
    for index in shared:
        compute += max(t[index][0] for t in per_rank) + max(t[index][1] for t in per_rank)
    if with_head:
        compute += nodes[0].memory.head_bytes / master.matvec_bytes_per_s(storage.weights)
    comm = 0.0
    if n > 1:
        wire = tokens * (config.hidden_size * WIRE_BYTES[cluster.wire_dtype]
                         + (4 if cluster.wire_dtype == "int8" else 0))
        step_msg = tokens * config.hidden_size * storage.compute_bytes
        comm = _broadcast(cluster, step_msg) + _allreduces(cluster, wire, 2 * len(shared))
    node_compute = tuple(sum(a + m for a, m in t.values()) for t in per_rank)
    node_disk = tuple(node.streamed_bytes / (cluster.nodes[i].profile.disk_bw_mbs * 1e6)
                      for i, node in enumerate(nodes))
    return StepTime(compute, comm, max(node_disk), node_compute, node_disk)


def _layer_times(node: NodePlan, profile: DeviceProfile, storage: Storage, tokens: int,
                 start: int, config: ModelConfig) -> dict[int, tuple[float, float]]:
    """layer index -> (attention, MLP) seconds of this node for one step."""
    mv = profile.matvec_bytes_per_s(storage.weights)
    flops = profile.flops_per_s(storage.kernel_dtype)
    mem, half = profile.mem_bw_gbs * 1e9, profile.layer_overhead_us * 0.5e-6
    params_per_byte, end = PARAMETERS_PER_BYTE[storage.weights], start + tokens
    out = {}
    for part in node.memory.layers:
        extra = 2 * (tokens - 1) * params_per_byte / flops  # s per weight byte beyond 1 token
        attn = part.attn_bytes * (1 / mv + extra)
        scores = 4 * tokens * end * config.head_dim * part.q_heads  # QK^T and AV
        attn += part.kv_bytes_per_position * end / mem + (scores / flops if tokens > 1 else 0)
        mlp = part.mlp_bytes * (1 / mv + extra)
        out[part.index] = (half + attn, half + mlp)
    return out


def _allreduces(cluster: ClusterSpec, nbytes: int, count: int) -> float:
    """``count`` allreduces of ``nbytes``: a gather to the master and a broadcast of the sum
    each (the step's last one a reduce: no broadcast), or the ring's 2(N-1) traversals of a 1/N
    chunk between neighbours."""
    if cluster.allreduce == "star":
        data = cluster.data_link
        return (count * _gather(cluster, nbytes, data)
                + (count - 1) * _broadcast(cluster, nbytes, data))
    n = len(cluster.nodes)
    overhead = 2 * max(node.profile.msg_overhead_us for node in cluster.nodes) * 1e-6
    traversal = (max(node.latency_s for node in cluster.nodes) + overhead
                 + nbytes / n * 8 / min(node.bits_per_s for node in cluster.nodes))
    return count * 2 * (n - 1) * traversal


def _gather(cluster: ClusterSpec, nbytes: int, data: bool) -> float:
    """Every worker sends ``nbytes`` to the master: the slowest worker's latency."""
    return max(n.latency_s for n in cluster.nodes[1:]) + _through_master(cluster, nbytes, data)


def _broadcast(cluster: ClusterSpec, nbytes: int, data: bool = False) -> float:
    """The master sends ``nbytes`` to every worker: the master's latency."""
    return cluster.nodes[0].latency_s + _through_master(cluster, nbytes, data)


def _message_cost(profile: DeviceProfile, data: bool) -> float:
    """Seconds of software per message: over the data link, or over ZeroMQ."""
    return (profile.data_msg_overhead_us if data else profile.msg_overhead_us) * 1e-6


def _through_master(cluster: ClusterSpec, nbytes: int, data: bool) -> float:
    """One traversal's software and wire time: the N-1 messages queue at the master's link,
    each at the slower end's bandwidth, with the master's and one worker's per-message cost."""
    master = cluster.nodes[0]
    worker_cost = max(_message_cost(n.profile, data) for n in cluster.nodes[1:])
    wire = sum(nbytes * 8 / min(master.bits_per_s, n.bits_per_s) for n in cluster.nodes[1:])
    return worker_cost + len(cluster.nodes[1:]) * _message_cost(master.profile, data) + wire


# -- the cluster -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterPlan:
    model: str
    config: ModelConfig
    dtype: str
    context: int
    prompt_tokens: int
    new_tokens: int
    cluster: ClusterSpec
    plan: ShardPlan
    nodes: tuple[NodePlan, ...]
    decode: StepTime  # one token at the middle of the generated stretch
    ttft_s: float
    storage: Storage = Storage()

    @property
    def parameters(self) -> int:
        return sum(n.memory.parameters for n in self.nodes)

    @property
    def fits(self) -> bool:
        return all(n.shortfall == 0 for n in self.nodes)

    @property
    def ms_per_token(self) -> float:
        return self.decode.total_s * 1e3

    def problems(self) -> list[str]:
        out = []
        for node in self.nodes:
            if node.shortfall:
                out.append(f"{node.name} cannot run its share: it needs at least "
                           f"{format_bytes(node.minimum_budget)} (KV cache, buffers and "
                           f"{self.cluster.ring_slots} buffers of its largest block) but its "
                           f"budget is {format_bytes(node.budget or 0)}, "
                           f"{format_bytes(node.shortfall)} short")
            free = self.cluster.nodes[node.rank].profile.free_memory
            if free is not None and node.peak_rss > free:
                out.append(f"{node.name}: predicted peak {format_bytes(node.peak_rss)} exceeds "
                           f"the {format_bytes(free)} its profile reports available")
        return out

    def bottleneck(self) -> str:
        """One sentence naming what bounds ms/token."""
        if not self.fits:
            return f"memory: {self.problems()[0]}"
        step, nodes = self.decode, self.nodes
        slow = max(range(len(nodes)), key=lambda i: step.node_compute_s[i])
        if step.disk_s >= step.compute_s + step.comm_s:
            i = max(range(len(nodes)), key=lambda i: step.node_disk_s[i])
            disk = self.cluster.nodes[i].profile.disk_bw_mbs
            return (f"disk: {nodes[i].name} streams {format_bytes(nodes[i].streamed_bytes)} "
                    f"per token at {disk:g} MB/s ({step.disk_s * 1e3:.0f} ms), longer than "
                    f"compute and communication ({(step.compute_s + step.comm_s) * 1e3:.0f} ms)")
        if step.comm_s > step.compute_s:
            cluster = self.cluster
            return (f"communication: {2 * len(self.plan.shared_layers)} {cluster.allreduce} "
                    f"allreduces and a step broadcast per token over {cluster.link_summary()} "
                    f"take {step.comm_s * 1e3:.1f} ms, "
                    f"more than compute ({step.compute_s * 1e3:.1f} ms); fewer nodes, faster "
                    "links or a smaller --wire-dtype would help")
        profile = self.cluster.nodes[slow].profile
        read = sum(nodes[slow].memory.needs.blocks)
        return (f"compute: {nodes[slow].name} reads {format_bytes(read)} of weights per token "
                f"at {profile.matvec_gbs[self.dtype]:g} GB/s ({step.node_compute_s[slow] * 1e3:.1f}"
                f" ms); the other ranks wait for it at every allreduce")

    def to_dict(self) -> dict[str, Any]:
        step = self.decode
        return {
            "model": self.model, "dtype": self.dtype, "context": self.context,
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "parameters": self.parameters, "float_dtype": self.storage.floats,
            "compute_dtype": self.storage.compute,
            "fits": self.fits, "problems": self.problems(),
            "shares": list(self.cluster.shares), "shares_arg": shares_arg(self.cluster.shares),
            "link": {"latency_ms": self.cluster.latency_ms,
                     "bandwidth_mbit": _finite(self.cluster.bandwidth_mbit),
                     "summary": self.cluster.link_summary(),
                     "wire_dtype": self.cluster.wire_dtype, "allreduce": self.cluster.allreduce},
            "nodes": [_node_dict(n) for n in self.nodes],
            "decode": {"ms_per_token": self.ms_per_token, "compute_ms": step.compute_s * 1e3,
                       "comm_ms": step.comm_s * 1e3, "disk_ms": step.disk_s * 1e3,
                       "node_compute_ms": [t * 1e3 for t in step.node_compute_s],
                       "node_disk_ms": [t * 1e3 for t in step.node_disk_s]},
            "ttft_ms": self.ttft_s * 1e3, "bottleneck": self.bottleneck(),
        }


def _finite(value: float) -> float | None:
    """JSON has no infinity: an unlimited figure is null."""
    return None if math.isinf(value) else value


def _node_dict(node: NodePlan) -> dict[str, Any]:
    names = node.memory.block_names
    return {
        "name": node.name, "rank": node.rank, "q_heads": node.q_heads,
        "kv_heads": node.kv_heads, "mlp_columns": node.mlp_columns,
        "weight_bytes": node.memory.weight_bytes, "file_bytes": node.memory.file_bytes,
        "kv_cache_bytes": node.memory.cache_bytes, "fixed_bytes": node.memory.needs.fixed,
        "blocks": list(node.memory.needs.blocks), "budget": node.budget,
        "minimum_budget": node.minimum_budget, "shortfall": node.shortfall,
        "pinned_blocks": [n for n, p in zip(names, node.pinned, strict=True) if p],
        "streamed_blocks": [n for n, p in zip(names, node.pinned, strict=True) if not p],
        "resident_bytes": node.resident_bytes, "streamed_bytes_per_token": node.streamed_bytes,
        "peak_rss": node.peak_rss,
    }


def plan_cluster(config: ModelConfig, cluster: ClusterSpec, dtype: str | Storage = "float32",
                 prompt_tokens: int = 128, context: int | None = None, new_tokens: int = 128,
                 model_name: str = "model") -> ClusterPlan:
    """Predict memory per node and TTFT and ms/token for ``config`` on ``cluster``."""
    storage = Storage.coerce(dtype)
    context = context or config.max_position_embeddings
    if prompt_tokens < 1 or prompt_tokens + new_tokens > context:
        raise ConfigError(f"{prompt_tokens} prompt + {new_tokens} new tokens do not fit a "
                          f"context of {context}; raise --context or lower --prompt-tokens")
    plan = make_plan(config, len(cluster.nodes), cluster.shares, cluster.private_layers)
    nodes = [node_plan(node, rank, plan, rank_memory(config, plan, rank, storage, context),
                       cluster.ring_slots) for rank, node in enumerate(cluster.nodes)]
    decode = step_time(cluster, nodes, config, storage, 1, prompt_tokens + new_tokens // 2)
    chunk = prefill_chunk(config, 0)
    ttft = sum(step_time(cluster, nodes, config, storage, min(chunk, prompt_tokens - start),
                         start, with_head=start + chunk >= prompt_tokens).total_s
               for start in range(0, prompt_tokens, chunk))
    return ClusterPlan(model_name, config, storage.weights, context, prompt_tokens, new_tokens,
                       cluster, plan, tuple(nodes), decode, ttft, storage)


# -- choosing shares ----------------------------------------------------------------------------

def _score(result: ClusterPlan | None) -> tuple[int, float]:
    if result is None:  # an int4 split these shares cannot make
        return (2, math.inf)
    shortfall = sum(n.shortfall for n in result.nodes)
    return (1, shortfall) if shortfall else (0, result.decode.total_s)


def optimize_shares(config: ModelConfig, cluster: ClusterSpec, **kwargs: Any) -> ClusterPlan:
    """The plan with per-node shares that minimise predicted ms/token within every budget.

    Start from shares proportional to each node's speed at equal shares, rebalance a few
    times, then refine one node at a time. Unequal shares must beat equal ones by MIN_GAIN.
    """
    def evaluate(shares: tuple[float, ...]) -> ClusterPlan | None:
        try:
            return plan_cluster(config, cluster.with_shares(shares), **kwargs)
        except QuantError:  # no int4 group divides these slice widths
            return None

    equal = plan_cluster(config, cluster.with_shares((1.0,) * len(cluster.nodes)), **kwargs)
    best, shares = equal, (1.0,) * len(cluster.nodes)
    for _ in range(12):  # rebalance: each node's share divided by its time per share
        times = [max(c, d, 1e-12) for c, d in zip(best.decode.node_compute_s,
                                                   best.decode.node_disk_s, strict=True)]
        mean = sum(times) / len(times)
        shares = _normalised(tuple(s * (mean / t) ** 0.7 for s, t in zip(shares, times,
                                                                        strict=True)))
        candidate = evaluate(shares)
        if candidate is not None and _score(candidate) < _score(best):
            best = candidate
    shares = best.cluster.shares
    for step in (0.3, 0.1, 0.03, 0.01):
        improved = True
        while improved:
            improved = False
            for i in range(len(shares)):
                for factor in (1 + step, 1 / (1 + step)):
                    trial = list(shares)
                    trial[i] *= factor
                    candidate = evaluate(_normalised(tuple(trial)))
                    if candidate is not None and _score(candidate) < _score(best):
                        best, shares, improved = candidate, candidate.cluster.shares, True
    gain = _score(equal)[0] > _score(best)[0] or (
        best.decode.total_s < equal.decode.total_s * (1 - MIN_GAIN))
    return (evaluate(simplest_shares(config, best.plan)) or best) if gain else equal


def _normalised(shares: tuple[float, ...]) -> tuple[float, ...]:
    low = min(shares)
    return tuple(s / low for s in shares)


def simplest_shares(config: ModelConfig, plan: ShardPlan) -> tuple[float, ...]:
    """Small whole numbers (else short decimals) that give exactly ``plan``'s split."""
    shares = _normalised(plan.shares)
    candidates = [tuple(float(max(1, round(s * m))) for s in shares) for m in range(1, 101)]
    candidates += [tuple(round(s, digits) for s in shares) for digits in (2, 4)]
    for candidate in candidates:
        if make_plan(config, plan.n_ranks, candidate, plan.private_layers).ranks == plan.ranks:
            return candidate
    return shares


def shares_arg(shares: tuple[float, ...]) -> str:
    """``(3.0, 2.0, 1.0)`` -> ``"3,2,1"`` (the --shares format of split and generate)."""
    return ",".join(f"{s:g}" for s in shares)


# -- text ---------------------------------------------------------------------------------------

def render_plan(result: ClusterPlan, equal: ClusterPlan | None = None) -> str:
    """The plan as a table and a few lines (``edgetp plan`` without --json)."""
    config, cluster, gib = result.config, result.cluster, 2**30
    params = result.parameters
    lines = [f"{result.model}: {params / 1e9:.2f} B parameters, {result.dtype}, context "
             f"{result.context}, {config.num_hidden_layers} layers "
             f"({len(result.plan.shared_layers)} shared)",
             f"cluster: {len(result.nodes)} nodes, {cluster.link_summary()}, "
             f"{cluster.allreduce} allreduce, wire "
             f"{cluster.wire_dtype}; shares "
             f"{shares_arg(cluster.shares)}", "",
             f"{'node':<12}{'heads':>6}{'kv':>4}{'mlp cols':>9}{'weights':>10}{'KV cache':>10}"
             f"{'budget':>9}{'minimum':>9}{'resident':>10}{'streamed':>10}{'peak RSS':>10}"
             "  window"]
    for node in result.nodes:
        budget = "-" if node.budget is None else f"{node.budget / gib:.2f}"
        lines.append(
            f"{node.name:<12}{node.q_heads:>6}{node.kv_heads:>4}{node.mlp_columns:>9}"
            f"{node.memory.weight_bytes / gib:>10.2f}{node.memory.cache_bytes / gib:>10.2f}"
            f"{budget:>9}{node.minimum_budget / gib:>9.2f}{node.resident_bytes / gib:>10.2f}"
            f"{node.streamed_bytes / gib:>10.2f}{node.peak_rss / gib:>10.2f}  "
            f"{_window_summary(node)}")
    step = result.decode
    lines += ["(sizes in GiB; resident = weights + KV cache + buffers held, what the budget "
              "covers; peak RSS adds the Python runtime)", "",
              f"ms/token: {result.ms_per_token:.1f} = max(compute {step.compute_s * 1e3:.1f} + "
              f"communication {step.comm_s * 1e3:.1f}, disk {step.disk_s * 1e3:.1f}) at position "
              f"~{result.prompt_tokens + result.new_tokens // 2}"
              + ("" if result.fits else " (were every node to fit)"),
              f"TTFT for a {result.prompt_tokens}-token prompt: {result.ttft_s * 1e3:.0f} ms",
              f"bottleneck: {result.bottleneck()}"]
    lines += [f"problem: {p}" for p in result.problems() if p not in lines[-1]]
    cache = max(n.memory.cache_bytes for n in result.nodes)
    if result.context == config.max_position_embeddings and cache > 2**30:
        lines.append(f"note: the KV cache for the model's full context of {result.context} "
                     f"positions takes up to {format_bytes(cache)} per node; plan with "
                     "--context N (run with --max-seq-len N) for less")
    if equal is not None:
        same = equal.cluster.shares == result.cluster.shares
        versus = (f"vs {equal.ms_per_token:.1f} with equal shares" if equal.fits
                  else "equal shares do not fit")
        lines.append(f"proposed: --shares {shares_arg(result.cluster.shares)} "
                     f"({result.ms_per_token:.1f} ms/token; {versus})" if not same else
                     f"proposed: --shares {shares_arg(result.cluster.shares)} (equal shares are "
                     f"already within {MIN_GAIN:.0%} of the best found)")
    return "\n".join(lines)


def _window_summary(node: NodePlan) -> str:
    if node.shortfall:
        return f"CANNOT FIT: {format_bytes(node.shortfall)} short"
    if not node.streams:
        return "all resident"
    names = node.memory.block_names
    streamed = [n for n, p in zip(names, node.pinned, strict=True) if not p]
    attn = sum(1 for n in streamed if n.endswith("self_attn"))
    mlp = sum(1 for n in streamed if n.endswith("mlp"))
    head = ", lm_head" if "lm_head" in streamed else ""
    return (f"pins {len(names) - len(streamed)}/{len(names)} blocks, streams {attn} attn + "
            f"{mlp} mlp{head}")
