"""The latency model: seconds of one step (a decode token or a prefill chunk) on a cluster.

Per step, each rank reads its weights once (``bytes / matvec bandwidth`` plus per-layer
overhead, KV reads at memory bandwidth; a T-token product adds ``2 (T - 1) params / matmul
rate``); every shared layer costs the slowest rank's attention and MLP plus two allreduces; a
step starts with one broadcast. Streamed blocks are read by a thread that never waits for
compute, so ``step = max(compute + communication, max over nodes of streamed bytes / disk
bandwidth)``.

A star allreduce is a gather to the master (``latency + k (overhead + bytes / bandwidth)``
with k = N-1 messages through the master's link; the slowest worker's latency) and a
broadcast of the sum (the master's latency); the step's last one is a reduce. Two nodes on the
data link exchange partials instead (edgetp.net.collectives): one traversal each way at once,
the slower of the two. A link profile
shapes what its node sends, and every message of a traversal crosses the master's link at the
slower of the two ends' bandwidth. The ring is 2(N-1) traversals of a 1/N chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgetp.config.device import DeviceProfile
from edgetp.config.model import ModelConfig
from edgetp.net.codec import carried_format, scale_shape
from edgetp.perf.planner.residency import NodePlan
from edgetp.perf.planner.spec import ClusterSpec
from edgetp.perf.planner.storage import Storage

PARAMETERS_PER_BYTE = {"float32": 0.25, "bfloat16": 0.5, "float16": 0.5, "int8": 1.0, "int4": 2.0}
WIRE_BYTES = {"f32": 4, "bf16": 2, "int8": 1}  # int8 adds its block scales (wire_bytes)


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
        compute += nodes[0].memory.head_bytes / master.matvec_bytes_per_s(storage.head_format)
    comm = 0.0
    if n > 1:
        carried = carried_format(cluster.wire_dtype, storage.compute,
                                 tokens * config.hidden_size)  # a prefill's bf16: bf16
        wire = tokens * wire_bytes(carried, config.hidden_size)
        step_msg = tokens * config.hidden_size * 4  # the residual stream is float32
        comm = _broadcast(cluster, step_msg) + _allreduces(cluster, wire, 2 * len(shared))
    node_compute = tuple(sum(a + m for a, m in t.values()) for t in per_rank)
    node_disk = tuple(node.streamed_bytes / (cluster.nodes[i].profile.disk_bw_mbs * 1e6)
                      for i, node in enumerate(nodes))
    return StepTime(compute, comm, max(node_disk), node_compute, node_disk)


def wire_bytes(wire_dtype: str, width: int) -> int:
    """Bytes of one token's partial or sum of ``width`` values on the wire."""
    scales = math.prod(scale_shape((width,))) * 4 if wire_dtype == "int8" else 0
    return width * WIRE_BYTES[wire_dtype] + scales


def _layer_times(node: NodePlan, profile: DeviceProfile, storage: Storage, tokens: int,
                 start: int, config: ModelConfig) -> dict[int, tuple[float, float]]:
    """layer index -> (attention, MLP) seconds of this node for one step."""
    mv = profile.matvec_bytes_per_s(storage.weights)
    flops = profile.flops_per_s(storage.kernel_dtype)
    mem, half = profile.mem_bw_gbs * 1e9, profile.layer_overhead_us * 0.5e-6
    params_per_byte, end = PARAMETERS_PER_BYTE[storage.weights], start + tokens
    extra = 2 * (tokens - 1) * params_per_byte / flops  # s per weight byte beyond 1 token
    if storage.weights == "int4" and int4_rows_one_by_one(profile.kernel_paths):
        extra = (tokens - 1) / mv  # each further row reads the weight again (qlinear.int4_rows)
    out = {}
    for part in node.memory.layers:
        attn = part.attn_bytes * (1 / mv + extra)
        scores = 4 * tokens * end * config.head_dim * part.q_heads  # QK^T and AV
        attn += part.kv_bytes_per_position * end / mem + (scores / flops if tokens > 1 else 0)
        mlp = part.mlp_bytes * (1 / mv + extra)
        out[part.index] = (half + attn, half + mlp)
    return out


def int4_rows_one_by_one(kernel_paths: dict[str, str] | None) -> bool:
    """Whether the device's runtime computes a multi-row int4 product as one C product per
    row (``edgetp.parallel.qlinear.int4_rows``): with its own int4 kernel, on every path but
    AVX-512's, whose torch int4 kernel reads the tiled bytes itself. A profile without kernel
    paths (an older one) keeps the matmul rate."""
    path = (kernel_paths or {}).get("i4")
    return path is not None and path not in ("torch", "avx512-vnni")


def _allreduces(cluster: ClusterSpec, nbytes: int, count: int) -> float:
    """``count`` allreduces of ``nbytes``: a gather to the master and a broadcast of the sum
    each (the step's last one a reduce: no broadcast; two nodes on the data link: the two
    partials' traversals at once), or the ring's 2(N-1) traversals of a 1/N
    chunk between neighbours."""
    if cluster.allreduce == "star":
        data = cluster.data_link
        if data and len(cluster.nodes) == 2:  # the exchange: both partials cross at once
            return count * max(_gather(cluster, nbytes, data), _broadcast(cluster, nbytes, data))
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
