"""One node's residency: which blocks stay in memory under its budget and which stream.

:func:`node_plan` mirrors ``load_rank``: everything resident when the share fits the budget,
else the window's own :func:`~edgetp.parallel.pinning.choose_pinned` picks the pinned blocks and
a ring of buffers holds the streamed ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgetp.parallel.pinning import choose_pinned
from edgetp.perf.planner.memory import RankMemory
from edgetp.perf.planner.spec import NodeSpec
from edgetp.shard.plan import ShardPlan


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

    def block_names(self, pinned: bool) -> list[str]:
        """The names of the pinned blocks (or of the streamed ones), in execution order."""
        return [name for name, p in zip(self.memory.block_names, self.pinned, strict=True)
                if p == pinned]


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
