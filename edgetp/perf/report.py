"""Latency reports: ``report.json`` (every figure, units in the names), ``report.md`` (tables),
``trace.json`` (Chrome trace format: open it in https://ui.perfetto.dev) and PNG charts.

A token's time on every node is split into compute, communication (allreduce), weight-read wait
and other (waiting for the master's head and sampler, Python and messaging overhead). Each
node's four parts add up to the measured decode time per token, so nodes can be compared.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetp.core.metrics import Span

BREAKDOWN = ("compute", "allreduce", "read_wait", "other")


@dataclass
class NodeRecord:
    """What one node measured: its facts (counters) and spans on the master's clock."""

    rank: int
    facts: dict[str, Any]
    spans: list[Span]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution_ms(values_ms: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values_ms) if values_ms else 0.0,
            "p50": percentile(values_ms, 0.5), "p90": percentile(values_ms, 0.9),
            "min": min(values_ms, default=0.0), "max": max(values_ms, default=0.0)}


def decode_steps(spans: list[Span], prefill_steps: int) -> list[Span]:
    """The node's step spans of decode steps (step numbers past the prefill chunks)."""
    return [s for s in spans if s.kind == "step" and s.index > prefill_steps]


def node_breakdown(node: NodeRecord, prefill_steps: int, ms_per_token: float,
                   shared_layers: Sequence[int]) -> dict[str, Any]:
    """Per-token means for one node: the four parts (ms) and per-layer figures."""
    steps = decode_steps(node.spans, prefill_steps)
    inside: dict[str, float] = defaultdict(float)
    per_layer: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    moved = 0
    for span in node.spans:
        if span.kind not in ("layer", "allreduce", "read_wait", "head") or not _within(span, steps):
            continue
        inside[span.kind] += span.duration_s
        layer = span.index
        if span.kind == "allreduce":
            layer = shared_layers[span.index // 2] if span.index // 2 < len(shared_layers) else -1
            moved += span.nbytes
        per_layer[layer][span.kind] += span.duration_s
    n = max(len(steps), 1)
    waits = inside["allreduce"] + inside["read_wait"]
    parts = {
        "compute": max(0.0, inside["layer"] + inside["head"] - waits) / n * 1000,
        "allreduce": inside["allreduce"] / n * 1000,
        "read_wait": inside["read_wait"] / n * 1000,
    }
    parts["other"] = max(0.0, ms_per_token - sum(parts.values()))
    layers = [
        {"layer": layer,
         "compute_ms": max(0.0, v["layer"] - v["allreduce"] - v["read_wait"]) / n * 1000,
         "allreduce_ms": v["allreduce"] / n * 1000, "read_wait_ms": v["read_wait"] / n * 1000}
        for layer, v in sorted(per_layer.items()) if layer >= 0
    ]
    return {"breakdown_ms_per_token": parts, "decode_steps": len(steps),
            "allreduce_bytes_per_token": moved / n, "per_layer": layers}


def _within(span: Span, steps: list[Span]) -> bool:
    middle = span.start_s + span.duration_s / 2
    return any(s.start_s <= middle <= s.start_s + s.duration_s for s in steps)


def build_report(runs: list[dict[str, Any]], nodes: list[NodeRecord], settings: dict[str, Any],
                 context: dict[str, Any], prefill_steps: int,
                 shared_layers: Sequence[int]) -> dict[str, Any]:
    """The whole report as one JSON-ready dict (units in the field names)."""
    decode_ms = [ms for run in runs for ms in run["decode_ms"]]
    ttft_ms = [run["ttft_ms"] for run in runs]
    decode = distribution_ms(decode_ms)
    summary = {
        "ttft_ms": distribution_ms(ttft_ms),
        "decode_ms_per_token": decode,
        "tokens_per_s": 1000 / statistics.fmean(decode_ms) if decode_ms else 0.0,
        "prompt_tokens": runs[0]["prompt_tokens"] if runs else 0,
        "generated_tokens_per_run": runs[0]["generated_tokens"] if runs else 0,
        "runs": len(runs),
    }
    mean_ms = decode["mean"]
    node_reports = []
    for node in sorted(nodes, key=lambda n: n.rank):
        entry = {"rank": node.rank, **_clean_facts(node.facts)}
        entry.update(node_breakdown(node, prefill_steps, mean_ms, shared_layers))
        node_reports.append(entry)
    return {"format": "edgetp-report", "version": 1, **context, "settings": settings,
            "summary": summary, "nodes": node_reports, "runs": runs}


def _clean_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """Keep only plain numbers and short strings (worker facts arrive over the network)."""
    return {str(k)[:64]: v for k, v in facts.items()
            if isinstance(v, int | float | bool) or (isinstance(v, str) and len(v) < 256)}


def chrome_trace(nodes: list[NodeRecord], hosts: dict[int, str]) -> dict[str, Any]:
    """Chrome trace events: one process (track) per node, compute and reader threads."""
    starts = [s.start_s for node in nodes for s in node.spans]
    origin = min(starts, default=0.0)
    events: list[dict[str, Any]] = []
    for node in nodes:
        events.append({"name": "process_name", "ph": "M", "pid": node.rank,
                       "args": {"name": f"rank {node.rank} ({hosts.get(node.rank, '?')})"}})
        for tid, name in ((0, "compute"), (1, "weight reader")):
            events.append({"name": "thread_name", "ph": "M", "pid": node.rank, "tid": tid,
                           "args": {"name": name}})
        for span in node.spans:
            events.append({
                "name": _span_name(span), "cat": span.kind, "ph": "X", "pid": node.rank,
                "tid": span.thread, "ts": round((span.start_s - origin) * 1e6, 3),
                "dur": round(span.duration_s * 1e6, 3),
                "args": {"index": span.index, "bytes": span.nbytes},
            })
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _span_name(span: Span) -> str:
    if span.kind in ("layer", "allreduce", "step") and span.index >= 0:
        return f"{span.kind} {span.index}"
    if span.kind in ("read", "read_wait"):
        return f"{span.kind} block {span.index}"
    return span.kind


def markdown(report: dict[str, Any]) -> str:
    s, summary = report["settings"], report["summary"]
    lines = [
        f"# edgetp bench: {report.get('model', {}).get('name', '?')} on {s['nodes']} node(s)",
        "",
        f"Prompt {summary['prompt_tokens']} tokens, {summary['generated_tokens_per_run']} "
        f"generated per run, {summary['runs']} run(s); weights {s.get('weight_dtype')}, "
        f"wire {s.get('wire_dtype')}, budget {s.get('memory_budget') or 'none'}, link "
        f"emulation: {s.get('link_emulation', 'none')}.",
        "",
        "| figure | mean | p50 | p90 |",
        "|---|---|---|---|",
        _row("time to first token (ms)", summary["ttft_ms"]),
        _row("decode (ms/token)", summary["decode_ms_per_token"]),
        "",
        f"Decode speed: **{summary['tokens_per_s']:.2f} tokens/s**.",
        "",
        "## Where a token's time goes, per node (ms/token)",
        "",
        "| node | compute | allreduce | weight-read wait | other | peak RSS (MiB) |"
        " streamed (MiB/token) |",
        "|---|---|---|---|---|---|---|",
    ]
    for node in report["nodes"]:
        b = node["breakdown_ms_per_token"]
        streamed = node.get("window_bytes_read_per_token", 0) / 2**20
        lines.append(
            f"| rank {node['rank']} ({node.get('host', '?')}) | {b['compute']:.2f} | "
            f"{b['allreduce']:.2f} | {b['read_wait']:.2f} | {b['other']:.2f} | "
            f"{node.get('peak_rss_bytes', 0) / 2**20:.0f} | {streamed:.2f} |")
    lines += ["", "*Other* is time outside this node's layers and waits: the master's head and "
              "sampling, idle time on workers, Python and messaging overhead.", ""]
    return "\n".join(lines)


def _row(label: str, dist: dict[str, float]) -> str:
    return f"| {label} | {dist['mean']:.2f} | {dist['p50']:.2f} | {dist['p90']:.2f} |"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")


def compare_markdown(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> str:
    """Side by side: every summary figure and every node's breakdown, with the ratio b/a."""
    lines = [f"# {name_b} vs {name_a}", "", f"| figure | {name_a} | {name_b} | ratio |",
             "|---|---|---|---|"]
    for label, get in _COMPARED:
        va, vb = get(a), get(b)
        lines.append(f"| {label} | {va:.2f} | {vb:.2f} | {_ratio(va, vb)} |")
    for node_a, node_b in zip(a["nodes"], b["nodes"], strict=False):
        for part in BREAKDOWN:
            va = node_a["breakdown_ms_per_token"][part]
            vb = node_b["breakdown_ms_per_token"][part]
            lines.append(f"| rank {node_a['rank']} {part} (ms/token) | {va:.2f} | {vb:.2f} | "
                         f"{_ratio(va, vb)} |")
        peak_a, peak_b = node_a.get("peak_rss_bytes", 0), node_b.get("peak_rss_bytes", 0)
        lines.append(f"| rank {node_a['rank']} peak RSS (MiB) | {peak_a / 2**20:.0f} | "
                     f"{peak_b / 2**20:.0f} | {_ratio(peak_a, peak_b)} |")
    if len(a["nodes"]) != len(b["nodes"]):
        lines += ["", f"(node counts differ: {len(a['nodes'])} vs {len(b['nodes'])}; "
                  "only the common ranks are compared)"]
    return "\n".join(lines) + "\n"


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}x" if a else "-"


_COMPARED = [
    ("decode ms/token (mean)", lambda r: r["summary"]["decode_ms_per_token"]["mean"]),
    ("decode ms/token (p90)", lambda r: r["summary"]["decode_ms_per_token"]["p90"]),
    ("time to first token ms (mean)", lambda r: r["summary"]["ttft_ms"]["mean"]),
    ("tokens/s", lambda r: r["summary"]["tokens_per_s"]),
]
