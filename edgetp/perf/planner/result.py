"""A plan of a model on a cluster: every node's memory, TTFT and ms/token, and what bounds them.

:func:`plan_cluster` makes the split's plan for the cluster's shares, each rank's exact memory
and residency, the decode step at the middle of the generated stretch and the prefill chunks
of the prompt; :class:`ClusterPlan` holds the result and says it in words and as JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgetp.config.model import ModelConfig
from edgetp.core.errors import ConfigError
from edgetp.core.units import format_bytes
from edgetp.perf.planner.memory import prefill_chunk, rank_memory
from edgetp.perf.planner.residency import NodePlan, node_plan
from edgetp.perf.planner.spec import ClusterSpec
from edgetp.perf.planner.storage import Storage
from edgetp.perf.planner.timing import StepTime, step_time
from edgetp.shard.plan import ShardPlan, make_plan


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
        step = self.decode
        if step.disk_s >= step.compute_s + step.comm_s:
            return self._disk_bound()
        if step.comm_s > step.compute_s:
            return self._communication_bound()
        return self._compute_bound()

    def _disk_bound(self) -> str:
        step, nodes = self.decode, self.nodes
        i = max(range(len(nodes)), key=lambda i: step.node_disk_s[i])
        disk = self.cluster.nodes[i].profile.disk_bw_mbs
        return (f"disk: {nodes[i].name} streams {format_bytes(nodes[i].streamed_bytes)} "
                f"per token at {disk:g} MB/s ({step.disk_s * 1e3:.0f} ms), longer than "
                f"compute and communication ({(step.compute_s + step.comm_s) * 1e3:.0f} ms)")

    def _communication_bound(self) -> str:
        step, cluster = self.decode, self.cluster
        return (f"communication: {2 * len(self.plan.shared_layers)} {cluster.allreduce} "
                f"allreduces and a step broadcast per token over {cluster.link_summary()} "
                f"take {step.comm_s * 1e3:.1f} ms, "
                f"more than compute ({step.compute_s * 1e3:.1f} ms); fewer nodes, faster "
                "links or a smaller --wire-dtype would help")

    def _compute_bound(self) -> str:
        step, nodes = self.decode, self.nodes
        slow = max(range(len(nodes)), key=lambda i: step.node_compute_s[i])
        profile = self.cluster.nodes[slow].profile
        read = sum(nodes[slow].memory.needs.blocks)
        return (f"compute: {nodes[slow].name} reads {format_bytes(read)} of weights per token "
                f"at {profile.matvec_gbs[self.dtype]:g} GB/s ({step.node_compute_s[slow] * 1e3:.1f}"
                f" ms); the other ranks wait for it at every allreduce")

    def to_dict(self) -> dict[str, Any]:
        step, cluster = self.decode, self.cluster
        return {
            "model": self.model, "dtype": self.dtype, "context": self.context,
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "parameters": self.parameters, "float_dtype": self.storage.floats,
            "compute_dtype": self.storage.compute,
            "fits": self.fits, "problems": self.problems(),
            "shares": list(cluster.shares), "shares_arg": shares_arg(cluster.shares),
            "link": {"latency_ms": cluster.latency_ms,
                     "bandwidth_mbit": _finite(cluster.bandwidth_mbit),
                     "summary": cluster.link_summary(),
                     "wire_dtype": cluster.wire_dtype, "allreduce": cluster.allreduce},
            "nodes": [_node_dict(n) for n in self.nodes],
            "decode": {"ms_per_token": self.ms_per_token, "compute_ms": step.compute_s * 1e3,
                       "comm_ms": step.comm_s * 1e3, "disk_ms": step.disk_s * 1e3,
                       "node_compute_ms": [t * 1e3 for t in step.node_compute_s],
                       "node_disk_ms": [t * 1e3 for t in step.node_disk_s]},
            "ttft_ms": self.ttft_s * 1e3, "bottleneck": self.bottleneck(),
        }


def shares_arg(shares: tuple[float, ...]) -> str:
    """``(3.0, 2.0, 1.0)`` -> ``"3,2,1"`` (the --shares format of split and generate)."""
    return ",".join(f"{s:g}" for s in shares)


def _finite(value: float) -> float | None:
    """JSON has no infinity: an unlimited figure is null."""
    return None if math.isinf(value) else value


def _node_dict(node: NodePlan) -> dict[str, Any]:
    return {
        "name": node.name, "rank": node.rank, "q_heads": node.q_heads,
        "kv_heads": node.kv_heads, "mlp_columns": node.mlp_columns,
        "weight_bytes": node.memory.weight_bytes, "file_bytes": node.memory.file_bytes,
        "kv_cache_bytes": node.memory.cache_bytes, "fixed_bytes": node.memory.needs.fixed,
        "blocks": list(node.memory.needs.blocks), "budget": node.budget,
        "minimum_budget": node.minimum_budget, "shortfall": node.shortfall,
        "pinned_blocks": node.block_names(pinned=True),
        "streamed_blocks": node.block_names(pinned=False),
        "resident_bytes": node.resident_bytes, "streamed_bytes_per_token": node.streamed_bytes,
        "peak_rss": node.peak_rss,
    }


def plan_cluster(config: ModelConfig, cluster: ClusterSpec, dtype: str | Storage = "float32",
                 prompt_tokens: int = 128, context: int | None = None, new_tokens: int = 128,
                 model_name: str = "model", kv_slots: int = 1) -> ClusterPlan:
    """Predict memory per node and TTFT and ms/token for ``config`` on ``cluster``; every
    node holds the KV cache of ``kv_slots`` sequences (decoding together: ``--max-batch``)."""
    storage = Storage.coerce(dtype)
    context = context or config.max_position_embeddings
    if prompt_tokens < 1 or prompt_tokens + new_tokens > context:
        raise ConfigError(f"{prompt_tokens} prompt + {new_tokens} new tokens do not fit a "
                          f"context of {context}; raise --context or lower --prompt-tokens")
    plan = make_plan(config, len(cluster.nodes), cluster.shares, cluster.private_layers)
    nodes = [node_plan(node, rank, plan, rank_memory(config, plan, rank, storage, context,
                                                     kv_slots=kv_slots),
                       cluster.ring_slots) for rank, node in enumerate(cluster.nodes)]
    decode = step_time(cluster, nodes, config, storage, 1, prompt_tokens + new_tokens // 2)
    chunk = prefill_chunk(config)
    ttft = sum(step_time(cluster, nodes, config, storage, min(chunk, prompt_tokens - start),
                         start, with_head=start + chunk >= prompt_tokens).total_s
               for start in range(0, prompt_tokens, chunk))
    return ClusterPlan(model_name, config, storage.weights, context, prompt_tokens, new_tokens,
                       cluster, plan, tuple(nodes), decode, ttft, storage)
