"""``edgetp bench``: a fixed workload on a local cluster, measured on every node, reported.

The workload is fixed-length (a synthetic prompt of P tokens, exactly G generated tokens,
no early stop at EOS), warmed up once, repeated R times. Every node's spans and counters are
collected, and the report is written as JSON, Markdown, a Chrome trace and PNG charts.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edgetp import __version__
from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.core import settings as env_settings
from edgetp.core.errors import ConfigError
from edgetp.core.files import read_json
from edgetp.core.metrics import RECORDER, node_facts, window_facts
from edgetp.core.settings import environment
from edgetp.core.units import format_bytes, parse_bytes
from edgetp.kernels import native
from edgetp.perf.charts import breakdown_chart, sweep_chart, tokens_chart
from edgetp.perf.report import NodeRecord, build_report, chrome_trace, markdown, write_json

if TYPE_CHECKING:
    from edgetp.runtime.local import LocalCluster
    from edgetp.runtime.master import Master

SWEEP_KEYS = ("nodes", "budget", "wire", "dtype", "allreduce", "link")


@dataclass(frozen=True)
class BenchSettings:
    model_dir: str
    nodes: int = 1
    shares: tuple[float, ...] | None = None
    prompt_tokens: int = 32
    new_tokens: int = 32
    repeat: int = 3
    warmup: int = 1
    memory_budget: str | None = None
    wire_dtype: str = "f32"
    dtype: str = "float32"
    private_layers: int = 0
    max_seq_len: int | None = None
    timeout_s: float = 30.0
    allreduce: str = "star"
    link: str | None = None  # a link profile (configs/links.yaml), emulated by the transport
    weight_dtype: str | None = None  # stored weights (None: the checkpoint's), e.g. int8
    group_size: int = 32  # int4's group
    secure: bool = False  # CURVE keys on loopback (the sealed data link), as on a home network
    head_dtype: str | None = None  # the lm_head's (None: the default for weight_dtype)
    threads: int | None = None  # per node (None: the machine's cores divided among the nodes)

    def label(self) -> str:
        parts = [f"nodes={self.nodes}"]
        if self.memory_budget:
            parts.append(f"budget={self.memory_budget}")
        if self.wire_dtype != "f32":
            parts.append(f"wire={self.wire_dtype}")
        if self.dtype != "float32":
            parts.append(f"dtype={self.dtype}")
        if self.allreduce != "star":
            parts.append(f"allreduce={self.allreduce}")
        if self.link:
            parts.append(f"link={self.link}")
        if self.weight_dtype is not None:
            parts.append(f"weights={self.weight_dtype}")
        if self.secure:
            parts.append("secure")
        if self.head_dtype is not None:
            parts.append(f"head={self.head_dtype}")
        if self.threads is not None:
            parts.append(f"threads={self.threads}")
        return ",".join(parts)


def synthetic_prompt(vocab_size: int, length: int, avoid: set[int]) -> list[int]:
    """A fixed, deterministic prompt of ``length`` token ids (no special tokens)."""
    ids = [i for i in range(vocab_size) if i not in avoid]
    return [ids[(7 * k + 3) % len(ids)] for k in range(length)]


def run_bench(settings: BenchSettings, out_dir: Path) -> dict[str, Any]:
    """Run the workload and write report.json, report.md, trace.json and the PNG charts."""
    with link_emulation(settings.link):
        return _run_bench(settings, out_dir)


@contextmanager
def link_emulation(profile_name: str | None) -> Iterator[None]:
    """Emulate a link profile for the processes started inside (the transport's send delay;
    on loopback there is no tc, so bandwidth is not limited: the report says so)."""
    if not profile_name or profile_name == "none":
        yield
        return
    from edgetp.config.links import load_profiles, transport_only

    profiles = load_profiles()
    if profile_name not in profiles:
        raise ConfigError(f"unknown link profile {profile_name!r}; known: {', '.join(profiles)}")
    with environment(transport_only(profiles[profile_name],
                                    "local cluster on loopback, no tc").env()):
        yield


def bench_cluster(settings: BenchSettings) -> LocalCluster:
    """The local cluster ``settings`` describe, not started (``with bench_cluster(s) as
    master``)."""
    from edgetp.runtime.local import LocalCluster

    budget = parse_bytes(settings.memory_budget) if settings.memory_budget else None
    max_seq = settings.max_seq_len or settings.prompt_tokens + settings.new_tokens + 8
    return LocalCluster(settings.model_dir, settings.nodes, settings.shares, settings.dtype,
                        max_seq, settings.private_layers, settings.wire_dtype,
                        settings.timeout_s, memory_budget=budget,
                        allreduce=settings.allreduce, weight_dtype=settings.weight_dtype,
                        group_size=settings.group_size, secure=settings.secure,
                        head_dtype=settings.head_dtype, threads=settings.threads)


def _run_bench(settings: BenchSettings, out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = parse_bytes(settings.memory_budget) if settings.memory_budget else None
    with bench_cluster(settings) as master:
        report, nodes = measure(master, settings, budget)
    hosts = {node["rank"]: node["host"] for node in report["nodes"]}
    write_reports(report, nodes, hosts, out_dir)
    return report


def measure(master: Master, settings: BenchSettings, budget: int | None,
            hosts: dict[int, str] | None = None, context: dict[str, Any] | None = None,
            ) -> tuple[dict[str, Any], list[NodeRecord]]:
    """The workload on a running ``master``: warm-up, ``settings.repeat`` runs, every node's
    spans and counters; the report (hosts named, ``hosts`` or what the workers reported;
    ``context`` added to the report's context)."""
    avoid = set(master.tokenizer.special_ids) | set(master.tokenizer.eos_token_ids)
    prompt = synthetic_prompt(master.model.config.vocab_size, settings.prompt_tokens, avoid)
    gen = GenerationConfig(max_new_tokens=settings.new_tokens, stop_on_eos=False)
    for _ in range(settings.warmup):
        master.engine.generate(prompt, SamplingConfig(), gen)
    _discard_measurements(master)
    runs = [_one_run(master, prompt, gen) for _ in range(settings.repeat)]
    nodes = _collect(master, budget)
    if hosts is None:
        hosts = {0: platform.node(), **master.worker_hosts()}
    context = {**_context(settings, master), **(context or {})}
    plan = master.plan
    assert plan is not None, "the workload runs on a cluster master (one rank or more)"
    prefill_steps = math.ceil(settings.prompt_tokens / master.prefill_chunk)
    report = build_report(runs, nodes, _settings_json(settings, budget), context, prefill_steps,
                          list(plan.shared_layers))
    _per_token_figures(report)
    for node in report["nodes"]:
        node["host"] = hosts.get(node["rank"], "?")
    return report, nodes


def _one_run(master: Master, prompt: list[int], gen: GenerationConfig) -> dict[str, Any]:
    result = master.engine.generate(prompt, SamplingConfig(), gen)
    return {"prompt_tokens": result.prompt_tokens, "generated_tokens": len(result.token_ids),
            "ttft_ms": result.ttft_ms, "decode_ms": result.decode_ms,
            "ms_per_token": result.ms_per_token}


def _discard_measurements(master: Master) -> None:
    RECORDER.take()
    window_facts(master.model)
    master.collect_stats()


def _collect(master: Master, budget: int | None) -> list[NodeRecord]:
    traffic = master.traffic
    facts = {**node_facts(), **window_facts(master.model), "threads_native": native.threads(),
             "bytes_sent": traffic.bytes_sent if traffic else 0,
             "bytes_received": traffic.bytes_received if traffic else 0,
             "memory_budget_bytes": budget or 0, "clock_offset_s": 0.0}
    nodes = [NodeRecord(0, facts, RECORDER.take())]
    for rank, (worker_facts, spans) in master.collect_stats().items():
        nodes.append(NodeRecord(rank, worker_facts, spans))
    return nodes


def _per_token_figures(report: dict[str, Any]) -> None:
    """Window reads per decoded token (counters cover every run, prefill included)."""
    tokens = sum(run["generated_tokens"] for run in report["runs"]) or 1
    for node in report["nodes"]:
        node["window_bytes_read_per_token"] = node.get("window_bytes_read", 0) / tokens


def _settings_json(settings: BenchSettings, budget: int | None) -> dict[str, Any]:
    values = asdict(settings)
    values["memory_budget_bytes"] = budget or 0
    values["weight_dtype"] = settings.weight_dtype or settings.dtype
    values["link_emulation"] = env_settings.link_emulation()
    return values


def _context(settings: BenchSettings, master: Master) -> dict[str, Any]:
    config = master.model.config
    return {
        "edgetp_version": __version__,
        "created_unix_s": time.time(),
        "machine": {"hostname": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__,
                    "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "model": {"name": Path(settings.model_dir).name, "config": config.to_dict()},
        "plan": master.plan.to_dict() if master.plan is not None else None,
        "prefill_chunk_tokens": master.prefill_chunk,
    }


def write_reports(report: dict[str, Any], nodes: list[NodeRecord], hosts: dict[int, str],
                  out_dir: Path) -> None:
    write_json(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(markdown(report))
    write_json(out_dir / "trace.json", chrome_trace(nodes, hosts))
    breakdown_chart(report, out_dir / "breakdown.png")
    tokens_chart(report, out_dir / "tokens.png")


# -- sweeps ------------------------------------------------------------------------------------

def parse_sweeps(specs: tuple[str, ...]) -> dict[str, list[str]]:
    """``("nodes=1,2,4", "budget=1GiB,512MiB")`` -> {"nodes": [...], "budget": [...]}."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, _, values = spec.partition("=")
        if key not in SWEEP_KEYS or not values:
            raise ConfigError(f"--sweep {spec!r}: write KEY=V1,V2 with KEY one of "
                              f"{', '.join(SWEEP_KEYS)}")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def run_sweep(base: BenchSettings, grid: dict[str, list[str]], out_dir: Path) -> list[dict]:
    """Run every combination; write one report per point and a comparison table and chart."""
    rows = []
    for values in itertools.product(*grid.values()):
        settings = _apply(base, dict(zip(grid, values, strict=True)))
        report = run_bench(settings, out_dir / settings.label().replace(",", "_"))
        slowest = max(report["nodes"], key=lambda n: sum(n["breakdown_ms_per_token"].values()))
        rows.append({"label": settings.label(), "summary": report["summary"],
                     "breakdown_ms_per_token": report["nodes"][0]["breakdown_ms_per_token"],
                     "slowest_rank": slowest["rank"],
                     "peak_rss_bytes_max": max(n.get("peak_rss_bytes", 0)
                                               for n in report["nodes"])})
    write_json(out_dir / "sweep.json", {"grid": grid, "rows": rows})
    (out_dir / "sweep.md").write_text(sweep_markdown(rows))
    sweep_chart(rows, out_dir / "sweep.png")
    return rows


def _apply(base: BenchSettings, point: dict[str, str]) -> BenchSettings:
    changes: dict[str, Any] = {}
    if "nodes" in point:
        changes["nodes"] = int(point["nodes"])
        changes["shares"] = None
    if "budget" in point:
        changes["memory_budget"] = None if point["budget"] in ("none", "") else point["budget"]
    if "wire" in point:
        changes["wire_dtype"] = point["wire"]
    if "dtype" in point:
        changes["dtype"] = point["dtype"]
    if "allreduce" in point:
        changes["allreduce"] = point["allreduce"]
    if "link" in point:
        changes["link"] = None if point["link"] == "none" else point["link"]
    return replace(base, **changes)


def sweep_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# edgetp bench sweep", "",
             "| configuration | ms/token (mean) | p90 | TTFT ms | tokens/s | compute | "
             "allreduce | read wait | other | max peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s, b = row["summary"], row["breakdown_ms_per_token"]
        lines.append(
            f"| {row['label']} | {s['decode_ms_per_token']['mean']:.2f} | "
            f"{s['decode_ms_per_token']['p90']:.2f} | {s['ttft_ms']['mean']:.1f} | "
            f"{s['tokens_per_s']:.2f} | {b['compute']:.2f} | {b['allreduce']:.2f} | "
            f"{b['read_wait']:.2f} | {b['other']:.2f} | "
            f"{format_bytes(row['peak_rss_bytes_max'])} |")
    lines += ["", "Breakdown columns are the master's (rank 0) ms per token.", ""]
    return "\n".join(lines)


def load_report(directory: Path) -> dict[str, Any]:
    return read_json(directory / "report.json", "report",
                     fix="give a directory written by `edgetp bench --out`")
