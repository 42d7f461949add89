"""The planner: memory and latency of a model on a cluster, predicted before anything runs.

Memory is not estimated but derived: the tensors each rank's split would hold come from the
same :func:`~edgetp.plan.make_plan` / :func:`~edgetp.plan.layer_slices` the splitter uses, the
window's blocks and fixed bytes follow the loader's rules (:class:`~edgetp.loader.MemoryNeeds`,
its ``_work_bytes``), and pinning is the window's own :func:`~edgetp.window.choose_pinned`. So
the weight bytes, KV cache bytes and block sizes equal those of a real split exactly (tested).

Time is a model over device profiles (:mod:`edgetp.probe`) and the link. Per token, each rank
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

The cluster file (YAML)::

    link: {latency_ms: 1, bandwidth_mbit: 300}   # one-way latency; per-link bandwidth
    wire_dtype: f32          # optional (f32 | bf16 | int8), as `--wire-dtype`
    allreduce: star          # optional (star | ring), as `--allreduce`
    private_layers: 0        # optional, as `--private-layers`
    nodes:                   # the first node is the master (rank 0)
      - name: desktop
        profile: desktop.json          # from `edgetp probe` (relative to this file) or inline
        memory_budget: 12GiB           # optional; default: the profile's free memory
        share: 2                       # optional relative share (default 1)
      - {name: pi, count: 2, memory_budget: 3GiB, profile: {mem_bw_gbs: 8, disk_bw_mbs: 300}}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from edgetp.config import ConfigError, ModelConfig, format_bytes, parse_bytes
from edgetp.loader import MemoryNeeds, _work_bytes
from edgetp.master import MAX_STEP_BYTES
from edgetp.plan import ShardPlan, TensorSlice, layer_slices, make_plan, master_tensors
from edgetp.probe import DeviceProfile, load_profile
from edgetp.split import layer_file
from edgetp.window import DEFAULT_RING_SLOTS, _aligned, choose_pinned

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAFETENSORS_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
WIRE_BYTES = {"f32": 4, "bf16": 2, "int8": 1}  # int8 adds a float32 scale per row
WORKER_PREFILL_CHUNK = 128  # load_rank's default, which workers use
MIN_GAIN = 0.02  # unequal shares must beat equal shares by this fraction to be proposed
CLUSTER_KEYS = {"nodes", "link", "wire_dtype", "private_layers", "ring_slots", "allreduce"}
NODE_KEYS = {"name", "memory_budget", "profile", "share", "count"}
LINK_KEYS = {"latency_ms", "bandwidth_mbit"}


# -- the cluster file ---------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeSpec:
    name: str
    profile: DeviceProfile
    memory_budget: int | None  # bytes for weights, KV cache and buffers; None: no limit
    share: float = 1.0


@dataclass(frozen=True)
class ClusterSpec:
    nodes: tuple[NodeSpec, ...]
    latency_ms: float = 0.0  # one way
    bandwidth_mbit: float = math.inf
    wire_dtype: str = "f32"
    private_layers: int = 0
    ring_slots: int = DEFAULT_RING_SLOTS
    allreduce: str = "star"  # or "ring" (edgetp.ring)

    @property
    def shares(self) -> tuple[float, ...]:
        return tuple(n.share for n in self.nodes)

    def with_shares(self, shares: tuple[float, ...]) -> ClusterSpec:
        nodes = tuple(replace(n, share=float(s)) for n, s in zip(self.nodes, shares, strict=True))
        return replace(self, nodes=nodes)


def load_cluster(path: str | Path) -> ClusterSpec:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    return parse_cluster(data, path.parent, str(path))


def parse_cluster(data: Any, base_dir: Path = Path("."), source: str = "cluster") -> ClusterSpec:
    """Validate a cluster mapping (see the module docstring); unknown keys are errors."""
    _check_keys(data, CLUSTER_KEYS, source)
    nodes_raw = data.get("nodes")
    if not isinstance(nodes_raw, list) or not nodes_raw:
        raise ConfigError(f"{source}: 'nodes' must be a non-empty list of nodes")
    nodes: list[NodeSpec] = []
    for index, raw in enumerate(nodes_raw):
        nodes += _parse_node(raw, base_dir, f"{source}: nodes[{index}]", len(nodes))
    link = data.get("link")
    if link is None and len(nodes) > 1:
        raise ConfigError(f"{source}: a cluster of {len(nodes)} nodes needs "
                          "link: {latency_ms: ..., bandwidth_mbit: ...}")
    link = link or {"latency_ms": 0, "bandwidth_mbit": math.inf}
    _check_keys(link, LINK_KEYS, f"{source}: link")
    wire = data.get("wire_dtype", "f32")
    if wire not in WIRE_BYTES:
        raise ConfigError(f"{source}: wire_dtype must be one of {', '.join(WIRE_BYTES)}")
    allreduce = data.get("allreduce", "star")
    if allreduce not in ("star", "ring"):
        raise ConfigError(f"{source}: allreduce must be star or ring, got {allreduce!r}")
    return ClusterSpec(
        tuple(nodes), _number(link.get("latency_ms"), "link.latency_ms", source, zero_ok=True),
        _number(link.get("bandwidth_mbit"), "link.bandwidth_mbit", source), wire,
        int(_number(data.get("private_layers", 0), "private_layers", source, zero_ok=True)),
        int(_number(data.get("ring_slots", DEFAULT_RING_SLOTS), "ring_slots", source)),
        allreduce)


def _parse_node(raw: Any, base_dir: Path, where: str, first_index: int) -> list[NodeSpec]:
    _check_keys(raw, NODE_KEYS, where)
    if "profile" not in raw:
        raise ConfigError(f"{where}: needs a profile (a JSON file from `edgetp probe` or an "
                          "inline mapping with at least mem_bw_gbs)")
    profile_raw = raw["profile"]
    if isinstance(profile_raw, str):
        profile = load_profile(base_dir / profile_raw)
    else:
        profile = DeviceProfile.from_dict(profile_raw, f"{where}.profile")
    budget_raw = raw.get("memory_budget")
    if budget_raw is None:
        free = profile.free_memory
        budget = None if free is None else max(0, free - profile.runtime_rss)
    else:
        try:
            budget = parse_bytes(budget_raw)
        except ConfigError as exc:
            raise ConfigError(f"{where}.memory_budget: {exc}") from None
    share = _number(raw.get("share", 1.0), "share", where)
    count = int(_number(raw.get("count", 1), "count", where))
    name = str(raw.get("name", f"node-{first_index}"))
    names = [name] if count == 1 else [f"{name}-{i}" for i in range(count)]
    return [NodeSpec(n, profile, budget, share) for n in names]


def _check_keys(data: Any, known: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(sorted(known))}")
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {', '.join(sorted(known))}")


def _number(value: Any, name: str, where: str, zero_ok: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if math.isnan(number) or number < 0 or (number == 0 and not zero_ok):
        raise ConfigError(f"{where}: {name} must be a positive number, got {value!r}")
    return number


# -- exact memory of one rank -------------------------------------------------------------------

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
    needs: MemoryNeeds  # exactly as edgetp.loader.shard_memory_needs computes it
    block_names: tuple[str, ...]
    layers: tuple[LayerPart, ...]
    head_bytes: int  # lm_head (0 on workers)
    file_sizes: dict[str, int] = field(default_factory=dict)


def rank_files(config: ModelConfig, plan: ShardPlan, rank: int) -> dict[str, dict[str, tuple]]:
    """File name -> tensor name -> shape, for every weight file ``split`` writes for ``rank``."""
    d, hd, inner = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    full = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (q, d), "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.weight": (kv, d), "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.weight": (kv, d), "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.weight": (d, q), "self_attn.o_proj.bias": (d,),
            "mlp.gate_proj.weight": (inner, d), "mlp.gate_proj.bias": (inner,),
            "mlp.up_proj.weight": (inner, d), "mlp.up_proj.bias": (inner,),
            "mlp.down_proj.weight": (d, inner), "mlp.down_proj.bias": (d,)}
    parts = layer_slices(plan, rank, config)
    sliced = {name: _slice_shape(full[name], part) for name, part in parts.items()}
    whole = {name: full[name] for name in parts}
    files: dict[str, dict[str, tuple]] = {}
    for layer in range(config.num_hidden_layers):
        if not plan.is_private(layer):
            files[layer_file(layer)] = sliced
        elif rank == 0:
            files[layer_file(layer)] = whole
    if rank == 0:
        shapes = {"embed_tokens.weight": (config.vocab_size, d), "norm.weight": (d,),
                  "lm_head.weight": (config.vocab_size, d)}
        for stem, names in master_tensors(config).items():
            files[f"{stem}.safetensors"] = {name: shapes[name] for name in names}
    return files


def _slice_shape(shape: tuple[int, ...], part: TensorSlice) -> tuple[int, ...]:
    if part.dim is None:
        return shape
    out = list(shape)
    out[part.dim] = part.stop - part.start
    return tuple(out)


def safetensors_size(shapes: dict[str, tuple], dtype: str) -> int:
    """The size of the file ``save_file`` writes for these tensors (one dtype) and edgetp's
    metadata: 8-byte length, JSON header padded to 8 bytes, data in name order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "producer": "edgetp"}}
    offset = 0
    for name in sorted(shapes):
        nbytes = math.prod(shapes[name]) * ELEMENT_BYTES[dtype]
        header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    length = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + length + (-length % 8) + offset


def prefill_chunk(config: ModelConfig, rank: int, requested: int = 128) -> int:
    """The prefill chunk the rank's loader is given (the master caps it by MAX_STEP_BYTES)."""
    if rank != 0:
        return WORKER_PREFILL_CHUNK
    return max(1, min(requested, MAX_STEP_BYTES // (4 * config.hidden_size)))


def rank_memory(config: ModelConfig, plan: ShardPlan, rank: int, dtype: str,
                max_seq_len: int | None = None, chunk: int | None = None) -> RankMemory:
    """Rank ``rank``'s bytes for weights stored and computed in ``dtype`` (see RankMemory)."""
    elem, seq = ELEMENT_BYTES[dtype], max_seq_len or config.max_position_embeddings
    files = rank_files(config, plan, rank)
    distinct = {id(shapes): shapes for shapes in files.values()}  # shared layers: one dict
    size_of = {key: safetensors_size(shapes, dtype) for key, shapes in distinct.items()}
    bytes_of = {key: {t: math.prod(s) * elem for t, s in shapes.items()}
                for key, shapes in distinct.items()}
    sizes = {name: size_of[id(shapes)] for name, shapes in files.items()}
    nbytes = {name: bytes_of[id(shapes)] for name, shapes in files.items()}
    share, hd = plan.share(rank), config.head_dim
    layers, blocks, names = [], [], []
    for index in range(config.num_hidden_layers):
        tensors = nbytes.get(layer_file(index))
        if tensors is None:
            continue
        shared = not plan.is_private(index)
        attn = sum(_aligned(b) for t, b in tensors.items() if t.startswith("self_attn."))
        mlp = sum(_aligned(b) for t, b in tensors.items() if t.startswith("mlp."))
        kv_heads = share.n_kv_heads if shared else config.num_key_value_heads
        q_heads = share.n_q_heads if shared else config.num_attention_heads
        layers.append(LayerPart(index, attn, mlp, 2 * kv_heads * hd * elem, q_heads, shared))
        blocks += [attn, mlp]
        names += [f"layers.{index}.self_attn", f"layers.{index}.mlp"]
    head = 0
    if rank == 0:
        head = _aligned(config.vocab_size * config.hidden_size * elem)
        blocks.append(head)
        names.append("lm_head")
    in_blocks = ("self_attn.", "mlp.", "lm_head.", "embed_tokens.")
    norms = sum(b for tensors in nbytes.values() for t, b in tensors.items()
                if not t.startswith(in_blocks))
    cache = sum(part.kv_bytes_per_position for part in layers) * seq
    rope = 2 * seq * hd * 4  # cos and sin tables, float32
    fake_model = SimpleNamespace(config=config, max_seq_len=seq,
                                 lm_head=object() if rank == 0 else None)
    work = _work_bytes(fake_model, chunk or prefill_chunk(config, rank))  # type: ignore[arg-type]
    needs = MemoryNeeds(cache + norms + rope + work, tuple(blocks),
                        sizes.get("embed.safetensors", 0))
    weight = sum(sum(tensors.values()) for tensors in nbytes.values())
    return RankMemory(rank, weight, sum(sizes.values()), cache, norms, needs, tuple(names),
                      tuple(layers), head, sizes)


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


def step_time(cluster: ClusterSpec, nodes: list[NodePlan], config: ModelConfig, dtype: str,
              tokens: int, start: int, with_head: bool = True) -> StepTime:
    """The critical path of one step of ``tokens`` tokens at positions ``start``.."""
    n = len(nodes)
    per_rank = [_layer_times(node, cluster.nodes[i].profile, dtype, tokens, start, config)
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
        compute += nodes[0].memory.head_bytes / master.matvec_bytes_per_s(dtype)
    comm = 0.0
    if n > 1:
        wire = tokens * (config.hidden_size * WIRE_BYTES[cluster.wire_dtype]
                         + (4 if cluster.wire_dtype == "int8" else 0))
        step_msg = tokens * config.hidden_size * ELEMENT_BYTES[dtype]
        comm = _hop(cluster, step_msg) + _allreduces(cluster, wire, 2 * len(shared))
    node_compute = tuple(sum(a + m for a, m in t.values()) for t in per_rank)
    node_disk = tuple(node.streamed_bytes / (cluster.nodes[i].profile.disk_bw_mbs * 1e6)
                      for i, node in enumerate(nodes))
    return StepTime(compute, comm, max(node_disk), node_compute, node_disk)


def _layer_times(node: NodePlan, profile: DeviceProfile, dtype: str, tokens: int, start: int,
                 config: ModelConfig) -> dict[int, tuple[float, float]]:
    """layer index -> (attention, MLP) seconds of this node for one step."""
    mv, flops = profile.matvec_bytes_per_s(dtype), profile.flops_per_s(dtype)
    mem, half = profile.mem_bw_gbs * 1e9, profile.layer_overhead_us * 0.5e-6
    elem, end = ELEMENT_BYTES[dtype], start + tokens
    out = {}
    for part in node.memory.layers:
        extra = 2 * (tokens - 1) / elem / flops  # seconds per weight byte beyond one token
        attn = part.attn_bytes * (1 / mv + extra)
        scores = 4 * tokens * end * config.head_dim * part.q_heads  # QK^T and AV
        attn += part.kv_bytes_per_position * end / mem + (scores / flops if tokens > 1 else 0)
        mlp = part.mlp_bytes * (1 / mv + extra)
        out[part.index] = (half + attn, half + mlp)
    return out


def _allreduces(cluster: ClusterSpec, nbytes: int, count: int) -> float:
    """``count`` allreduces of ``nbytes``: the star's two traversals each (the last one a
    reduce), or the ring's 2(N-1) traversals of a 1/N chunk between neighbours."""
    if cluster.allreduce == "star":
        return (2 * count - 1) * _hop(cluster, nbytes)
    n = len(cluster.nodes)
    overhead = 2 * max(node.profile.msg_overhead_us for node in cluster.nodes) * 1e-6
    traversal = (cluster.latency_ms * 1e-3 + overhead
                 + nbytes / n * 8 / (cluster.bandwidth_mbit * 1e6))
    return count * 2 * (n - 1) * traversal


def _hop(cluster: ClusterSpec, nbytes: int) -> float:
    """One traversal of the star: N-1 messages through the master's link."""
    k = len(cluster.nodes) - 1
    master = cluster.nodes[0].profile.msg_overhead_us * 1e-6
    worker = max(n.profile.msg_overhead_us for n in cluster.nodes[1:]) * 1e-6
    per_message = master + nbytes * 8 / (cluster.bandwidth_mbit * 1e6)
    return cluster.latency_ms * 1e-3 + worker + k * per_message


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
                    f"allreduces and a step broadcast per token over {cluster.latency_ms:g} ms, "
                    f"{cluster.bandwidth_mbit:g} Mbit/s links take {step.comm_s * 1e3:.1f} ms, "
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
            "parameters": sum(n.memory.weight_bytes for n in self.nodes)
            // ELEMENT_BYTES[self.dtype],
            "fits": self.fits, "problems": self.problems(),
            "shares": list(self.cluster.shares), "shares_arg": shares_arg(self.cluster.shares),
            "link": {"latency_ms": self.cluster.latency_ms,
                     "bandwidth_mbit": self.cluster.bandwidth_mbit,
                     "wire_dtype": self.cluster.wire_dtype, "allreduce": self.cluster.allreduce},
            "nodes": [_node_dict(n) for n in self.nodes],
            "decode": {"ms_per_token": self.ms_per_token, "compute_ms": step.compute_s * 1e3,
                       "comm_ms": step.comm_s * 1e3, "disk_ms": step.disk_s * 1e3,
                       "node_compute_ms": [t * 1e3 for t in step.node_compute_s],
                       "node_disk_ms": [t * 1e3 for t in step.node_disk_s]},
            "ttft_ms": self.ttft_s * 1e3, "bottleneck": self.bottleneck(),
        }


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


def plan_cluster(config: ModelConfig, cluster: ClusterSpec, dtype: str = "float32",
                 prompt_tokens: int = 128, context: int | None = None, new_tokens: int = 128,
                 model_name: str = "model") -> ClusterPlan:
    """Predict memory per node and TTFT and ms/token for ``config`` on ``cluster``."""
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype {dtype!r}: plan float32 or bfloat16")
    context = context or config.max_position_embeddings
    if prompt_tokens < 1 or prompt_tokens + new_tokens > context:
        raise ConfigError(f"{prompt_tokens} prompt + {new_tokens} new tokens do not fit a "
                          f"context of {context}; raise --context or lower --prompt-tokens")
    plan = make_plan(config, len(cluster.nodes), cluster.shares, cluster.private_layers)
    nodes = [node_plan(node, rank, plan, rank_memory(config, plan, rank, dtype, context),
                       cluster.ring_slots) for rank, node in enumerate(cluster.nodes)]
    decode = step_time(cluster, nodes, config, dtype, 1, prompt_tokens + new_tokens // 2)
    chunk = prefill_chunk(config, 0)
    ttft = sum(step_time(cluster, nodes, config, dtype, min(chunk, prompt_tokens - start), start,
                         with_head=start + chunk >= prompt_tokens).total_s
               for start in range(0, prompt_tokens, chunk))
    return ClusterPlan(model_name, config, dtype, context, prompt_tokens, new_tokens, cluster,
                       plan, tuple(nodes), decode, ttft)


# -- choosing shares ----------------------------------------------------------------------------

def _score(result: ClusterPlan) -> tuple[int, float]:
    shortfall = sum(n.shortfall for n in result.nodes)
    return (1, shortfall) if shortfall else (0, result.decode.total_s)


def optimize_shares(config: ModelConfig, cluster: ClusterSpec, **kwargs: Any) -> ClusterPlan:
    """The plan with per-node shares that minimise predicted ms/token within every budget.

    Start from shares proportional to each node's speed at equal shares, rebalance a few
    times, then refine one node at a time. Unequal shares must beat equal ones by MIN_GAIN.
    """
    def evaluate(shares: tuple[float, ...]) -> ClusterPlan:
        return plan_cluster(config, cluster.with_shares(shares), **kwargs)

    equal = evaluate((1.0,) * len(cluster.nodes))
    best, shares = equal, (1.0,) * len(cluster.nodes)
    for _ in range(12):  # rebalance: each node's share divided by its time per share
        times = [max(c, d, 1e-12) for c, d in zip(best.decode.node_compute_s,
                                                   best.decode.node_disk_s, strict=True)]
        mean = sum(times) / len(times)
        shares = _normalised(tuple(s * (mean / t) ** 0.7 for s, t in zip(shares, times,
                                                                        strict=True)))
        candidate = evaluate(shares)
        if _score(candidate) < _score(best):
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
                    if _score(candidate) < _score(best):
                        best, shares, improved = candidate, candidate.cluster.shares, True
    gain = _score(equal)[0] > _score(best)[0] or (
        best.decode.total_s < equal.decode.total_s * (1 - MIN_GAIN))
    return evaluate(simplest_shares(config, best.plan)) if gain else equal


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
    params = sum(n.memory.weight_bytes for n in result.nodes) / ELEMENT_BYTES[result.dtype]
    lines = [f"{result.model}: {params / 1e9:.2f} B parameters, {result.dtype}, context "
             f"{result.context}, {config.num_hidden_layers} layers "
             f"({len(result.plan.shared_layers)} shared)",
             f"cluster: {len(result.nodes)} nodes, link {cluster.latency_ms:g} ms one way, "
             f"{cluster.bandwidth_mbit:g} Mbit/s, {cluster.allreduce} allreduce, wire "
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
