"""Llama 2 70B on eight 3.1 GB devices, run on this machine and set beside TPI-LLM's figures.

Run (root, Linux: network namespaces and cgroups)::

    .venv/bin/python benchmarks/seventy_b.py [--preset llama2-70b] [--dtype int4] [--layers N]
        [--shards DIR] [--nodes 8] [--memory-limit 3.1GB] [--profile tpi-llm]
        [--allreduce star|ring] [--wire-dtype f32|bf16|int8]
        [--prompt-tokens 32] [--new-tokens 8] [--work DIR] [--keep] [--json]

Exit status 0 when every target of issue 20 is met, 3 when the run completed but one was missed.

1. **Model.** ``--shards DIR`` runs a real split; otherwise ``edgetp synth-split`` writes a
   random model of the preset's shape (:mod:`edgetp.shard.synthetic`: 43 GB for llama2-70b in
   int4 with 32-column groups, the free space checked first) into ``--work``, deleted at the end
   unless ``--keep``. ``--layers N`` writes N of the model's layers (a smaller run, see 6).
2. **Disk.** The parallel read rate of this disk: eight readers at once (one per node), each
   reading its rank's weight files one tensor per ``pread`` as the window does, with their page
   cache dropped before (``fsync``, then ``posix_fadvise(DONTNEED)``; a page cache the readers
   hit would make the figure a memory speed, and the script says so when it sees one). Measured
   before and after the run; the higher figure counts (other work on the machine only ever
   slows a disk down, so the higher one is nearer what the disk can do).
3. **Planner.** ``edgetp probe --threads 1`` of this machine on the split's disk; each node's
   profile is the probe's with its compute figures scaled by cores / nodes (eight nodes share
   this machine's cores) and its disk rate the parallel rate / nodes (they share one disk).
4. **Memory.** Every node gets a cgroup limit of ``--memory-limit`` (TPI-LLM's 3.1 GB; no swap
   here) and an edgetp budget of the limit less the probe's runtime (python + torch + edgetp)
   and :data:`SLACK`: the window pins what fits and streams the rest from disk.
5. **Run.** The namespace testbed (:mod:`edgetp.ops.testbed`): eight namespaces with the
   ``tpi-llm`` link (300 Mbit/s, 1 ms), one cgroup each, a greedy generation, then the bench
   workload: a ``--prompt-tokens`` prompt and ``--new-tokens`` generated tokens. The table (and
   with ``--json`` one JSON object) gives s/token and TTFT, per node the cgroup's peak against
   its limit, bytes read per token and the read rate reached, the disk bound (bytes streamed per
   token by all nodes over the parallel read rate), the planner's figures, TPI-LLM's published
   ones, and each target of issue 20 met or missed. The cgroup's peak counts the page cache of
   the files a node read (reclaimable, dropped as the window goes), so the planner's peak (a
   process's resident memory) is held against the node's peak RSS (VmHWM), and the cgroup's
   against its limit.
6. **Fewer layers.** With ``--layers N`` below the model's, the budgets shrink with the model:
   beyond its fixed part and its ring (which do not shrink), each node pins the same fraction
   of its blocks as it would at full size, so per layer the run reads what the full run reads.
   Per-token time is then per-layer time (the streamed bytes, the allreduces) times N plus the
   master's head and step, so the full model's s/token is extrapolated as ``measured x
   planner(full) / planner(N)``: the planner's ratio carries the fixed parts, the measurement
   everything else. That holds when the small run is bound as the full one is (by the disk:
   take 8 layers or more; with 4, compute and the master's head weigh more than at 80). int8
   at 80 layers (70 GB) does not fit beside an int4 split (43 GB) on an 80 GB disk: run it
   alone, or with fewer layers (``--dtype int8 --layers 16``).

Eight nodes of 3.1 GB are 24.8 GB of limits, and the budgets fill them: on a 24 GiB machine
stop other work first (the script warns when the limits exceed what is available).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgetp.config.cluster import ClusterConfig, parse_cluster_config  # noqa: E402
from edgetp.config.device import DeviceProfile  # noqa: E402
from edgetp.config.links import load_profiles  # noqa: E402
from edgetp.config.model import ModelConfig, parse_hf_config  # noqa: E402
from edgetp.core.units import parse_bytes  # noqa: E402
from edgetp.perf.planner import (  # noqa: E402
    ClusterPlan,
    ClusterSpec,
    NodeSpec,
    Storage,
    plan_cluster,
    rank_memory,
)
from edgetp.perf.presets import hf_config  # noqa: E402
from edgetp.shard.layout import rank_dir  # noqa: E402
from edgetp.shard.manifest import read_manifest  # noqa: E402

TPI_LLM: dict[str, Any] = {
    "source": "TPI-LLM (arXiv 2410.00531), Llama 2 70B, float32, 8 devices, 300 Mbit/s and 1 ms "
              "links", "s_per_token": 26.1, "peak_bytes_per_device": 3.1e9}
SLACK = 192 << 20  # allocator, activations, sockets and page cache between budget and limit
DISK_READ_BYTES = 768 << 20  # per reader
PROMPT = "count by 3 : 5"  # the testbed's greedy generation (the demo tokenizer's characters)
TARGETS = {"disk_bound_ratio": 1.25, "planner_time": 0.25, "planner_memory": 0.10}
MISSED = 3  # the exit status when the run completed but a target was missed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama2-70b", help="model shape (edgetp presets)")
    parser.add_argument("--dtype", default="int4", choices=["int4", "int8", "bfloat16"])
    parser.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128],
                        help="int4's group (32: 43 GB for llama2-70b, 128: 37 GB)")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (see 6)")
    parser.add_argument("--shards", type=Path, default=None, help="run this split instead")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--memory-limit", default="3.1GB", help="cgroup limit per node")
    parser.add_argument("--profile", default="tpi-llm", help="link profile of every node")
    parser.add_argument("--allreduce", default="star", choices=["star", "ring"])
    parser.add_argument("--wire-dtype", default="f32", choices=["f32", "bf16", "int8"],
                        help="activations on the wire (f32 as TPI-LLM; bf16 halves a prompt's "
                             "allreduces, which the 300 Mbit/s link bounds)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the split and the logs")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds for the run")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    return parser.parse_args(argv)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- 1. the split -------------------------------------------------------------------------------


def make_split(args: argparse.Namespace, work: Path) -> Path:
    """The split to run: ``--shards``, or a synthetic one written into ``work``."""
    if args.shards is not None:
        return args.shards.resolve()
    split = work / f"{args.preset}-{args.dtype}-{args.layers or 'all'}-{args.nodes}-split"
    command = [sys.executable, "-m", "edgetp.cli", "synth-split", "--preset", args.preset,
               "--ranks", str(args.nodes), "--dtype", args.dtype, "--seed", str(args.seed),
               "--group-size", str(args.group_size),
               "--out", str(split)] + ([] if args.layers is None else ["--layers",
                                                                        str(args.layers)])
    started = time.perf_counter()
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)  # bar: stderr
    elapsed = time.perf_counter() - started
    size = sum(p.stat().st_size for p in split.rglob("*.safetensors"))
    if done.stdout.startswith("reused"):
        say(f"reused the {size / 1e9:.1f} GB split in {split}")
    else:
        say(f"wrote {size / 1e9:.1f} GB in {elapsed:.0f} s ({size / elapsed / 1e6:.0f} MB/s, "
            f"python's start included) into {split}")
    return split


# -- 2. the disk ----------------------------------------------------------------------------------


def read_like_the_window(directory: Path, limit: int, done: list[int]) -> None:
    """Read up to ``limit`` bytes of a rank's layer files, one ``pread`` per tensor, their
    page cache dropped before and after (what a streaming node does)."""
    manifest = read_manifest(directory)
    total = 0
    for name in sorted(n for n in manifest.files if n.startswith("layer-")):
        fd = os.open(directory / name, os.O_RDONLY)
        try:
            os.fsync(fd)  # pages still dirty from the writer cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for entry in manifest.files[name].tensors.values():
                start, stop = entry.offsets
                total += len(os.pread(fd, stop - start, start))
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if total >= limit:
            break
    done.append(total)


def parallel_read_rate(split: Path, nodes: int) -> dict[str, Any]:
    """MB/s of this disk with ``nodes`` readers at once (each its own rank), and one alone."""
    def timed(ranks: list[int]) -> float:
        done: list[int] = []
        threads = [threading.Thread(target=read_like_the_window,
                                    args=(rank_dir(split, r), DISK_READ_BYTES, done))
                   for r in ranks]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(done) / (time.perf_counter() - started) / 1e6

    single = timed([nodes - 1])
    parallel = timed(list(range(nodes)))
    return {"parallel_mbs": parallel, "single_mbs": single, "readers": nodes,
            "page_cache_suspected": parallel > 20000}


# -- 3. the planner -------------------------------------------------------------------------------


def probe(split: Path, out: Path) -> dict[str, Any]:
    """``edgetp probe --threads 1`` on the split's disk, in a fresh process."""
    subprocess.run([sys.executable, "-m", "edgetp.cli", "probe", "--threads", "1",
                    "--shard-dir", str(split), "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dict(json.loads(out.read_text()))


def node_profile(raw: dict[str, Any], nodes: int, disk_mbs: float) -> DeviceProfile:
    """The probe's profile as one of ``nodes`` processes sharing this machine and its disk."""
    profile = DeviceProfile.from_dict(raw)
    f = min(1.0, (os.cpu_count() or 1) / nodes)
    return replace(profile, mem_bw_gbs=profile.mem_bw_gbs * f,
                   matvec_gbs={k: v * f for k, v in profile.matvec_gbs.items()},
                   flops_gflops={k: v * f for k, v in profile.flops_gflops.items()},
                   layer_overhead_us=profile.layer_overhead_us / f,
                   step_overhead_us=profile.step_overhead_us / f,
                   msg_overhead_us=profile.msg_overhead_us / f,
                   data_msg_overhead_us=profile.data_msg_overhead_us / f,
                   disk_bw_mbs=disk_mbs / nodes)


def plan(config: ModelConfig, profile: DeviceProfile, budgets: list[int], storage: Storage,
         args: argparse.Namespace, context: int) -> ClusterPlan:
    """The planner's figures for the cluster the run has (its link, allreduce and wire)."""
    link = load_profiles()[args.profile]
    cluster = ClusterSpec(tuple(NodeSpec(f"node-{r}", profile, budget, link=link)
                                for r, budget in enumerate(budgets)),
                          wire_dtype=args.wire_dtype, allreduce=args.allreduce)
    return plan_cluster(config, cluster, storage, args.prompt_tokens, context, args.new_tokens,
                        "synthetic")


# -- 4. memory ----------------------------------------------------------------------------------


def budgets_for(config: ModelConfig, full: ModelConfig, nodes: int, storage: Storage,
                limit: int, runtime: int, context: int) -> tuple[list[int], list[int]]:
    """Per node (budget, cgroup limit): the limit less the runtime and :data:`SLACK`; with
    fewer layers than ``full``, both shrink so each node pins the fraction of its blocks the
    full model would (see the module docstring, 6)."""
    from edgetp.shard.plan import make_plan

    budgets, limits = [], []
    for rank in range(nodes):
        budget = limit - runtime - SLACK
        if config.num_hidden_layers < full.num_hidden_layers:
            whole = rank_memory(full, make_plan(full, nodes), rank, storage, context).needs
            part = rank_memory(config, make_plan(config, nodes), rank, storage, context).needs
            pinned = max(0.0, (budget - whole.minimum()) / sum(whole.blocks))  # beyond the ring
            budget = int(part.minimum() + pinned * sum(part.blocks))
        budgets.append(budget)
        limits.append(budget + runtime + SLACK)
    return budgets, limits


# -- 5. the run ---------------------------------------------------------------------------------


def cluster_config(split: Path, budgets: list[int], limits: list[int],
                   args: argparse.Namespace) -> ClusterConfig:
    nodes = [{"name": f"node-{k}", "address": f"10.77.0.{k + 1}", "threads": 1,
              "shard_dir": str(rank_dir(split, k)), "memory_budget": budgets[k],
              "memory_limit": limits[k], "link": args.profile} for k in range(len(budgets))]
    data = {"name": "seventy-b", "model": str(split), "split_dir": str(split),
            "master": {"port": 5555}, "nodes": nodes, "timeout": 1800,
            "allreduce": args.allreduce, "wire_dtype": args.wire_dtype}
    return parse_cluster_config(data, "benchmarks/seventy_b.py", Path.cwd(), "seventy-b")


def run_in_namespaces(config: ClusterConfig, out: Path, args: argparse.Namespace
                      ) -> dict[str, Any]:
    from edgetp.ops.testbed import TestbedRun, run_testbed

    context = args.prompt_tokens + args.new_tokens + 16
    spec = TestbedRun(config, out, PROMPT, args.new_tokens, bench=True,
                      bench_tokens=args.prompt_tokens, bench_repeat=1,
                      join_timeout_s=args.timeout, run_timeout_s=args.timeout,
                      bench_new_tokens=args.new_tokens, bench_warmup=0, max_seq_len=context)
    return run_testbed(spec, say)


# -- 6. results -----------------------------------------------------------------------------------


def node_rows(report: dict[str, Any], bench: dict[str, Any], plan_: ClusterPlan,
              budgets: list[int]) -> list[dict[str, Any]]:
    """Per node: its cgroup's peak and limit, what it read per token and how fast, the plan."""
    measured = {n["rank"]: n for n in bench["nodes"]}
    rows = []
    for node, planned in zip(report["nodes"], plan_.nodes, strict=True):
        seen = measured.get(node["rank"], {})
        read_s = seen.get("window_read_s", 0.0)
        rows.append({
            "rank": node["rank"], "peak_bytes": node.get("cgroup_peak_bytes"),
            "peak_rss_bytes": seen.get("peak_rss_bytes"),
            "limit_bytes": node["memory_limit_bytes"], "budget_bytes": budgets[node["rank"]],
            "bytes_read_per_token": seen.get("window_bytes_read_per_token", 0.0),
            "read_rate_mbs": seen.get("window_bytes_read", 0) / read_s / 1e6 if read_s else None,
            "pinned_blocks": seen.get("window_pinned_blocks"),
            "streamed_blocks": seen.get("window_streamed_blocks"),
            "planner_peak_bytes": planned.peak_rss,
            "planner_streamed_bytes_per_token": planned.streamed_bytes})
    return rows


def targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 20's targets, each with its figure and whether it is met."""
    s, nodes = result["s_per_token"], result["nodes"]
    peaks_known = all(n["peak_bytes"] for n in nodes)
    memory = [abs(n["planner_peak_bytes"] / n["peak_rss_bytes"] - 1) for n in nodes
              if n["peak_rss_bytes"]]
    return {
        "completes": {"met": result["generated_tokens"] >= result["new_tokens"]},
        "peaks_under_limits": {"met": peaks_known and all(
            n["peak_bytes"] <= n["limit_bytes"] for n in nodes)},
        "disk_bound": _disk_target(s, result["disk_bound_s_per_token"]),
        "planner_time": {"ratio": result["planner_s_per_token"] / s,
                         "met": abs(result["planner_s_per_token"] / s - 1)
                         <= TARGETS["planner_time"]},
        "planner_memory": {"worst": max(memory, default=math.inf),
                           "met": bool(memory) and max(memory) <= TARGETS["planner_memory"]},
    }


def _disk_target(s_per_token: float, bound: float) -> dict[str, Any]:
    """s/token within :data:`TARGETS` of the disk bound; None (not applicable) when nothing
    streamed (every block fit its node's budget)."""
    if bound <= 0:
        return {"met": None}
    return {"ratio": s_per_token / bound,
            "met": s_per_token <= TARGETS["disk_bound_ratio"] * bound}


def summarise(args: argparse.Namespace, report: dict[str, Any], disk: dict[str, Any],
              plans: dict[str, ClusterPlan], budgets: list[int],
              layers: tuple[int, int]) -> dict[str, Any]:
    bench = json.loads((Path(report["bench"]["report_dir"]) / "report.json").read_text())
    summary = bench["summary"]
    nodes = node_rows(report, bench, plans["run"], budgets)
    streamed = sum(n["bytes_read_per_token"] for n in nodes)
    s_per_token = summary["decode_ms_per_token"]["mean"] / 1e3
    result: dict[str, Any] = {
        "preset": args.preset, "dtype": args.dtype, "layers": layers[0],
        "model_layers": layers[1], "nodes_count": args.nodes, "link": args.profile,
        "allreduce": args.allreduce, "wire_dtype": args.wire_dtype,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "generated_tokens": min(r["generated_tokens"] for r in bench["runs"]),
        "token_ids": report["generation"]["token_ids"],
        "s_per_token": s_per_token, "ttft_s": summary["ttft_ms"]["mean"] / 1e3,
        "disk": disk, "streamed_bytes_per_token": streamed,
        "disk_bound_s_per_token": streamed / (disk["parallel_mbs"] * 1e6),
        "planner_s_per_token": plans["run"].ms_per_token / 1e3,
        "planner_ttft_s": plans["run"].ttft_s, "planner_bottleneck": plans["run"].bottleneck(),
        "nodes": nodes, "tpi_llm": TPI_LLM}
    if "full" in plans:
        scale = plans["full"].ms_per_token / plans["run"].ms_per_token
        result["full_model"] = {"layers": layers[1], "planner_s_per_token":
                                plans["full"].ms_per_token / 1e3,
                                "extrapolated_s_per_token": s_per_token * scale}
    result["targets"] = targets(result)
    return result


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def table(result: dict[str, Any]) -> str:
    disk = result["disk"]
    lines = [
        f"{result['preset']} {result['dtype']}, {result['layers']} of {result['model_layers']} "
        f"layers, {result['nodes_count']} nodes, link {result['link']}, "
        f"{result['allreduce']} allreduce, wire {result['wire_dtype']}, "
        f"{result['prompt_tokens']}-token prompt, {result['generated_tokens']} generated "
        f"(first tokens {result['token_ids'][:8]})",
        f"disk: {disk['parallel_mbs']:.0f} MB/s with {disk['readers']} readers at once "
        f"({disk['single_mbs']:.0f} MB/s alone; before/after the run "
        f"{disk['parallel_mbs_before_after'][0]:.0f}/{disk['parallel_mbs_before_after'][1]:.0f})"
        + ("  WARNING: as fast as memory, the page cache answered" if
           disk["page_cache_suspected"] else ""), "",
        "rank | limit GiB | budget GiB | cgroup peak GiB | peak RSS GiB | planner peak GiB | "
        "read/token MiB | planner MiB | read MB/s | pinned/streamed blocks", "-" * 133]
    for n in result["nodes"]:
        rate = "-" if n["read_rate_mbs"] is None else f"{n['read_rate_mbs']:.0f}"
        lines.append(
            f"{n['rank']:>4} | {gib(n['limit_bytes']):>9} | {gib(n['budget_bytes']):>10} | "
            f"{gib(n['peak_bytes']):>15} | {gib(n['peak_rss_bytes']):>12} | "
            f"{gib(n['planner_peak_bytes']):>16} | "
            f"{n['bytes_read_per_token'] / 2**20:>14.0f} | "
            f"{n['planner_streamed_bytes_per_token'] / 2**20:>11.0f} | {rate:>9} | "
            f"{n['pinned_blocks']}/{n['streamed_blocks']}")
    lines += ["", f"{'':<34}{'s/token':>9}{'TTFT s':>9}",
              f"{'measured':<34}{result['s_per_token']:>9.2f}{result['ttft_s']:>9.2f}",
              f"{'disk bound (all nodes, one disk)':<34}{result['disk_bound_s_per_token']:>9.2f}",
              f"{'planner (probe of this machine)':<34}{result['planner_s_per_token']:>9.2f}"
              f"{result['planner_ttft_s']:>9.2f}"]
    full = result.get("full_model")
    if full:
        lines += [f"{'full model, extrapolated':<34}{full['extrapolated_s_per_token']:>9.2f}",
                  f"{'full model, planner':<34}{full['planner_s_per_token']:>9.2f}"]
    lines += [f"{'TPI-LLM (paper, float32)':<34}{TPI_LLM['s_per_token']:>9.2f}"
              f"   peak {TPI_LLM['peak_bytes_per_device'] / 1e9:.1f} GB per device",
              f"planner: {result['planner_bottleneck']}", "", "targets:"]
    for name, target in result["targets"].items():
        figures = ", ".join(f"{k} {v:.2f}" for k, v in target.items() if k != "met")
        verdict = {True: "met", False: "MISSED", None: "n/a (nothing streamed)"}[target["met"]]
        lines.append(f"  {name:<20} {verdict}"
                     + (f" ({figures})" if figures else ""))
    return "\n".join(lines)


# -- putting it together --------------------------------------------------------------------------


def model_configs(args: argparse.Namespace, split: Path) -> tuple[ModelConfig, ModelConfig]:
    """(the config run, the full model's config)."""
    manifest = read_manifest(rank_dir(split, 0))
    config = manifest.model_config
    if args.shards is not None:
        return config, config
    full = hf_config(args.preset)
    return config, parse_hf_config(full)


def warn_if_memory_is_short(nodes: int, limit: int) -> None:
    """The limits are caps, but the budgets fill them: say so if they add up to more than
    this machine has available (the kernel would then kill processes, not the cgroups)."""
    with open("/proc/meminfo") as meminfo:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo}
    available = fields.get("MemAvailable", 0)
    if nodes * limit > available:
        say(f"WARNING: {nodes} nodes x {limit / 1e9:.2f} GB = {nodes * limit / 1e9:.1f} GB of "
            f"cgroup limits, but only {available / 1e9:.1f} GB are available here; stop other "
            "work, or lower --memory-limit")


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    split = make_split(args, work)
    config, full = model_configs(args, split)
    manifest = read_manifest(rank_dir(split, 0))
    storage = Storage.of(manifest.dtype, "bfloat16" if manifest.dtype in ("int4", "int8")
                         else manifest.dtype, "float32", manifest.group_size or 32,
                         head=manifest.head_format)  # synth-split's int4 head, not int8's
    raw = probe(split, work / "profile.json")
    context = args.prompt_tokens + args.new_tokens + 16
    limit = int(parse_bytes(args.memory_limit))
    budgets, limits = budgets_for(config, full, args.nodes, storage, limit,
                                  int(raw["runtime_rss"]), context)
    warn_if_memory_is_short(args.nodes, max(limits))
    before = parallel_read_rate(split, args.nodes)
    say(f"disk: {before['parallel_mbs']:.0f} MB/s with {args.nodes} readers, "
        f"{before['single_mbs']:.0f} MB/s alone; running the testbed ...")
    report = run_in_namespaces(cluster_config(split, budgets, limits, args), work / "testbed",
                               args)
    after = parallel_read_rate(split, args.nodes)
    disk = max(before, after, key=lambda d: d["parallel_mbs"])  # other load only slows a disk
    disk["parallel_mbs_before_after"] = [before["parallel_mbs"], after["parallel_mbs"]]
    profile = node_profile(raw, args.nodes, disk["parallel_mbs"])
    plans = {"run": plan(config, profile, budgets, storage, args, context)}
    if full.num_hidden_layers != config.num_hidden_layers:
        full_budgets = [limit - int(raw["runtime_rss"]) - SLACK] * args.nodes
        plans["full"] = plan(full, profile, full_budgets, storage, args, context)
    return summarise(args, report, disk, plans, budgets,
                     (config.num_hidden_layers, full.num_hidden_layers))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="edgetp-70b-", dir="/work"
                                               if Path("/work").is_dir() else None))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        print(table(result))
    return 0 if all(t["met"] is not False for t in result["targets"].values()) else MISSED


if __name__ == "__main__":
    sys.exit(main())
