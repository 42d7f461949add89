"""Choosing per-node shares: the split that minimises predicted ms/token within every budget.

Start from shares proportional to each node's speed at equal shares, rebalance a few times,
then refine one node at a time with shrinking steps. Unequal shares must beat equal ones by
:data:`MIN_GAIN` to be proposed, and are then written as the simplest numbers that give the
same split (what ``--shares`` takes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from edgetp.config.model import ModelConfig
from edgetp.perf.planner.result import ClusterPlan, plan_cluster
from edgetp.perf.planner.spec import ClusterSpec
from edgetp.shard.plan import ShardPlan, make_plan
from edgetp.shard.quant import QuantError

MIN_GAIN = 0.02  # unequal shares must beat equal shares by this fraction to be proposed
REBALANCE_ROUNDS = 12
REFINE_STEPS = (0.3, 0.1, 0.03, 0.01)  # relative changes of one node's share, tried in turn

Evaluate = Callable[[tuple[float, ...]], ClusterPlan | None]


def _score(result: ClusterPlan | None) -> tuple[int, float]:
    if result is None:  # an int4 split these shares cannot make
        return (2, math.inf)
    shortfall = sum(n.shortfall for n in result.nodes)
    return (1, shortfall) if shortfall else (0, result.decode.total_s)


def optimize_shares(config: ModelConfig, cluster: ClusterSpec, **kwargs: Any) -> ClusterPlan:
    """The plan with per-node shares that minimise predicted ms/token within every budget
    (``kwargs`` as :func:`~edgetp.perf.planner.result.plan_cluster` takes them)."""
    def evaluate(shares: tuple[float, ...]) -> ClusterPlan | None:
        try:
            return plan_cluster(config, cluster.with_shares(shares), **kwargs)
        except QuantError:  # no int4 group divides these slice widths
            return None

    equal = plan_cluster(config, cluster.with_shares((1.0,) * len(cluster.nodes)), **kwargs)
    best = _refined(_rebalanced(equal, evaluate), evaluate)
    gain = _score(equal)[0] > _score(best)[0] or (
        best.decode.total_s < equal.decode.total_s * (1 - MIN_GAIN))
    return (evaluate(simplest_shares(config, best.plan)) or best) if gain else equal


def _rebalanced(equal: ClusterPlan, evaluate: Evaluate) -> ClusterPlan:
    """Rebalance rounds: each node's share divided by its time per share (damped)."""
    best, shares = equal, (1.0,) * len(equal.nodes)
    for _ in range(REBALANCE_ROUNDS):
        times = [max(c, d, 1e-12) for c, d in zip(best.decode.node_compute_s,
                                                   best.decode.node_disk_s, strict=True)]
        mean = sum(times) / len(times)
        shares = _normalised(tuple(s * (mean / t) ** 0.7 for s, t in zip(shares, times,
                                                                        strict=True)))
        candidate = evaluate(shares)
        if candidate is not None and _score(candidate) < _score(best):
            best = candidate
    return best


def _refined(best: ClusterPlan, evaluate: Evaluate) -> ClusterPlan:
    """One node's share up or down at a time, while that helps, with ever smaller steps."""
    shares = best.cluster.shares
    for step in REFINE_STEPS:
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
    return best


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
