"""The plan in words: the table and the few lines ``edgetp plan`` prints without ``--json``."""

from __future__ import annotations

from edgetp.core.units import format_bytes
from edgetp.perf.planner.residency import NodePlan
from edgetp.perf.planner.result import ClusterPlan, shares_arg
from edgetp.perf.planner.shares import MIN_GAIN

GIB = 2**30
TABLE_HEADER = (f"{'node':<12}{'heads':>6}{'kv':>4}{'mlp cols':>9}{'weights':>10}{'KV cache':>10}"
                f"{'budget':>9}{'minimum':>9}{'resident':>10}{'streamed':>10}{'peak RSS':>10}"
                "  window")


def render_plan(result: ClusterPlan, equal: ClusterPlan | None = None) -> str:
    """The plan as a table and a few lines (``edgetp plan`` without --json); ``equal``: the
    plan at equal shares, when ``result``'s shares were optimised."""
    lines = [*_heading(result), "", TABLE_HEADER, *(_node_row(n) for n in result.nodes)]
    lines += _summary(result)
    lines += [f"problem: {p}" for p in result.problems() if p not in lines[-1]]
    cache = max(n.memory.cache_bytes for n in result.nodes)
    if result.context == result.config.max_position_embeddings and cache > GIB:
        lines.append(f"note: the KV cache for the model's full context of {result.context} "
                     f"positions takes up to {format_bytes(cache)} per node; plan with "
                     "--context N (run with --max-seq-len N) for less")
    if equal is not None:
        lines.append(_proposal(result, equal))
    return "\n".join(lines)


def _heading(result: ClusterPlan) -> list[str]:
    config, cluster = result.config, result.cluster
    return [f"{result.model}: {result.parameters / 1e9:.2f} B parameters, {result.dtype}, "
            f"context {result.context}, {config.num_hidden_layers} layers "
            f"({len(result.plan.shared_layers)} shared)",
            f"cluster: {len(result.nodes)} nodes, {cluster.link_summary()}, "
            f"{cluster.allreduce} allreduce, wire {cluster.wire_dtype}; shares "
            f"{shares_arg(cluster.shares)}"]


def _node_row(node: NodePlan) -> str:
    budget = "-" if node.budget is None else f"{node.budget / GIB:.2f}"
    return (f"{node.name:<12}{node.q_heads:>6}{node.kv_heads:>4}{node.mlp_columns:>9}"
            f"{node.memory.weight_bytes / GIB:>10.2f}{node.memory.cache_bytes / GIB:>10.2f}"
            f"{budget:>9}{node.minimum_budget / GIB:>9.2f}{node.resident_bytes / GIB:>10.2f}"
            f"{node.streamed_bytes / GIB:>10.2f}{node.peak_rss / GIB:>10.2f}  "
            f"{_window_summary(node)}")


def _summary(result: ClusterPlan) -> list[str]:
    step = result.decode
    return ["(sizes in GiB; resident = weights + KV cache + buffers held, what the budget "
            "covers; peak RSS adds the Python runtime)", "",
            f"ms/token: {result.ms_per_token:.1f} = max(compute {step.compute_s * 1e3:.1f} + "
            f"communication {step.comm_s * 1e3:.1f}, disk {step.disk_s * 1e3:.1f}) at position "
            f"~{result.prompt_tokens + result.new_tokens // 2}"
            + ("" if result.fits else " (were every node to fit)"),
            f"TTFT for a {result.prompt_tokens}-token prompt: {result.ttft_s * 1e3:.0f} ms",
            f"bottleneck: {result.bottleneck()}"]


def _proposal(result: ClusterPlan, equal: ClusterPlan) -> str:
    shares = shares_arg(result.cluster.shares)
    if equal.cluster.shares == result.cluster.shares:
        return (f"proposed: --shares {shares} (equal shares are already within {MIN_GAIN:.0%} "
                "of the best found)")
    versus = (f"vs {equal.ms_per_token:.1f} with equal shares" if equal.fits
              else "equal shares do not fit")
    return f"proposed: --shares {shares} ({result.ms_per_token:.1f} ms/token; {versus})"


def _window_summary(node: NodePlan) -> str:
    if node.shortfall:
        return f"CANNOT FIT: {format_bytes(node.shortfall)} short"
    if not node.streams:
        return "all resident"
    names = node.memory.block_names
    streamed = node.block_names(pinned=False)
    attn = sum(1 for n in streamed if n.endswith("self_attn"))
    mlp = sum(1 for n in streamed if n.endswith("mlp"))
    head = ", lm_head" if "lm_head" in streamed else ""
    return (f"pins {len(names) - len(streamed)}/{len(names)} blocks, streams {attn} attn + "
            f"{mlp} mlp{head}")
