"""The planner against reality: predicted vs measured ms/token, TTFT and peak memory.

Run::

    .venv/bin/python benchmarks/planner_check.py [--quick] [--json] [--keep DIR]

1. Writes a seeded synthetic Llama checkpoint large enough to measure (hidden 1024, MLP 2816,
   16 heads over 4 KV heads, 4 layers, vocab 8000: 61 M parameters, 246 MB in float32), once in
   float32 and once in bfloat16, with the demo model's tokenizer files.
2. Profiles this machine with ``edgetp probe --threads 1`` (workers run one torch thread each)
   in a fresh process, on the split's disk, and measures the loopback link (latency, bandwidth)
   against an echo peer.
3. For each configuration (1/2/3 nodes, float32/bfloat16/int8, with and without a budget),
   splits the model, runs a fresh process that starts a ``LocalCluster`` and generates a fixed
   workload (a warm-up, then a measured run: P prompt tokens, G new tokens, no early stop),
   and reads every process's peak RSS (VmHWM) before the cluster stops.
4. Plans the same cluster with the probe's profile, and prints predicted vs measured figures
   with their ratio (predicted / measured; the aim is within 25%).

Every node here is a process on this one machine: with more nodes than CPU cores, nodes
compete for cores and memory bandwidth. The planner assumes separate devices, so for those
rows the profile's speeds are scaled by cores / nodes (said in the output). The disk is not
divided among streaming ranks: parallel reads scaled on the machine this was written on.

Other work on a shared machine only ever slows a run (or a probe) down, so both sides take
their best: the profile is the best figure of three probes, the measured ms/token the median
per-token time of the best of four runs, the measured TTFT the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgetp.config.device import DeviceProfile  # noqa: E402
from edgetp.config.links import LinkProfile  # noqa: E402
from edgetp.config.model import load_model_config  # noqa: E402
from edgetp.perf.planner import ClusterSpec, NodeSpec, Storage, plan_cluster  # noqa: E402
from edgetp.perf.probe import measure_link, serve_echo  # noqa: E402

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
    "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 8000,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}
CONTEXT = 256
# (nodes, dtype, budget as a fraction of the biggest rank's no-streaming need, or None)
CONFIGS = [(1, "float32", None), (2, "float32", None), (3, "float32", None),
           (1, "bfloat16", None), (2, "bfloat16", None), (3, "bfloat16", None),
           (1, "int8", None), (2, "int8", None),
           (1, "float32", 0.5), (2, "float32", 0.6), (2, "bfloat16", 0.6)]
QUICK_CONFIGS = [(1, "float32", None), (2, "float32", None), (2, "bfloat16", 0.6)]

CHILD = r"""
import json, pathlib, sys, torch
torch.set_num_threads(1)
from edgetp.runtime.local import LocalCluster
from edgetp.config.generation import GenerationConfig, SamplingConfig

args = json.loads(sys.argv[1])

def hwm(pid="self"):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

prompt = [3 + (i * 37) % 100 for i in range(args["prompt"])]
gen = GenerationConfig(max_new_tokens=args["new"], stop_on_eos=False)
cluster = LocalCluster(args["model"], args["nodes"], dtype=args["compute"],
                       max_seq_len=args["context"], memory_budget=args["budget"],
                       split_dir=pathlib.Path(args["split"]), timeout_s=60.0,
                       weight_dtype=args["dtype"])
try:
    master = cluster.start()
    runs = [master.engine.generate(prompt, SamplingConfig(), gen) for _ in range(args["runs"])]
    peaks = [hwm()] + [hwm(cluster.workers[r].pid) for r in range(1, args["nodes"])]
finally:
    cluster.stop()
import statistics
print(json.dumps({"ms_per_token": min(statistics.median(r.decode_ms) for r in runs[1:]),
                  "ttft_ms": min(r.ttft_ms for r in runs[1:]), "peaks": peaks}))
"""


def write_model(root: Path, dtype: str) -> Path:
    """The synthetic checkpoint (seeded), in ``dtype``, with the demo tokenizer."""
    import torch
    from safetensors.torch import save_file

    from edgetp.config.model import parse_hf_config
    from edgetp.model.checkpoint import expected_tensor_names
    from edgetp.model.demo import DEMO_MODEL_DIR

    path = root / f"synthetic-{dtype}"
    if (path / "model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = parse_hf_config(CONFIG)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in _shapes(config).items():
        assert name in expected_tensor_names(config), name
        scale = 1.0 if "norm" in name else 0.02
        value = torch.randn(shape, generator=generator) * scale + (1.0 if "norm" in name else 0)
        tensors[name] = value.to(getattr(torch, dtype)).contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**CONFIG, "torch_dtype": dtype}, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(DEMO_MODEL_DIR) / name, path / name)
    return path


def _shapes(config: Any) -> dict[str, tuple[int, ...]]:
    d, hd, inner = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    out = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,),
           "lm_head.weight": (config.vocab_size, d)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                    p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                    p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                    p + "mlp.gate_proj.weight": (inner, d), p + "mlp.up_proj.weight": (inner, d),
                    p + "mlp.down_proj.weight": (d, inner)})
    return out


def probe_profile(split_dir: Path, out: Path, times: int) -> dict[str, Any]:
    """``edgetp probe --threads 1`` in fresh processes (as a user would run it), ``times``
    times; each figure is the best of the probes (other load only ever makes one worse)."""
    command = [sys.executable, "-m", "edgetp.cli", "probe", "--threads", "1", "--shard-dir",
               str(split_dir), "--out", str(out)]
    probes = []
    for _ in range(times):
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probes.append(json.loads(out.read_text()))
    best = dict(probes[0])
    for key in ("mem_bw_gbs", "disk_bw_mbs"):
        best[key] = max(p[key] for p in probes)
    for key in ("matvec_gbs", "flops_gflops"):
        best[key] = {d: max(p[key][d] for p in probes) for d in best[key]}
    for key in ("layer_overhead_us", "step_overhead_us", "msg_overhead_us",
                "data_msg_overhead_us", "runtime_rss"):
        best[key] = min(p[key] for p in probes)
    return best


def loopback_link() -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = threading.Thread(target=serve_echo, args=(port, 12 + 5, "127.0.0.1"),
                              daemon=True)
    server.start()
    link = measure_link(f"tcp://127.0.0.1:{port}", 10)
    server.join(timeout=10)
    return link


def measure(model_dir: Path, split_dir: Path, nodes: int, dtype: str, budget: int | None,
            prompt: int, new: int, runs: int) -> dict[str, Any]:
    args = {"model": str(model_dir), "split": str(split_dir), "nodes": nodes, "dtype": dtype,
            "compute": _float(dtype), "budget": budget, "context": CONTEXT, "prompt": prompt,
            "new": new, "runs": runs}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGETP_LOG": "WARNING"}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def predict(config: Any, profile: DeviceProfile, link: dict[str, float], nodes: int, dtype: str,
            budget: int | None, prompt: int, new: int) -> Any:
    cores = os.cpu_count() or 1
    if nodes > cores:  # processes share this machine's cores and memory bandwidth
        f = cores / nodes
        profile = replace(profile, mem_bw_gbs=profile.mem_bw_gbs * f,
                          matvec_gbs={k: v * f for k, v in profile.matvec_gbs.items()},
                          flops_gflops={k: v * f for k, v in profile.flops_gflops.items()},
                          layer_overhead_us=profile.layer_overhead_us / f,
                          step_overhead_us=profile.step_overhead_us / f,
                          msg_overhead_us=profile.msg_overhead_us / f,
                          data_msg_overhead_us=profile.data_msg_overhead_us / f)
    loopback = LinkProfile("loopback", 0.0, 0.0, link["bandwidth_mbit"])
    cluster = ClusterSpec(tuple(NodeSpec(f"local-{r}", profile, budget, link=loopback)
                                for r in range(nodes)))
    storage = Storage.of(dtype, _float(dtype))  # quantized: the float32 checkpoint's floats
    return plan_cluster(config, cluster, storage, prompt, CONTEXT, new, "synthetic")


def _float(dtype: str) -> str:
    """The checkpoint (and compute) dtype of a row: int8 rows quantize the float32 model."""
    return "float32" if dtype == "int8" else dtype


def budget_for(config: Any, nodes: int, dtype: str, fraction: float | None) -> int | None:
    """A budget that makes every rank stream: a fraction of the largest rank's full need."""
    if fraction is None:
        return None
    from edgetp.perf.planner import rank_memory
    from edgetp.shard.plan import make_plan

    plan = make_plan(config, nodes)
    storage = Storage.of(dtype, _float(dtype))
    needs = [rank_memory(config, plan, r, storage, CONTEXT).needs for r in range(nodes)]
    worst = max(needs, key=lambda n: n.total)
    return max(max(n.minimum() for n in needs), int(worst.total * fraction))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="three configurations, fewer tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.add_argument("--keep", type=Path, default=None, help="work directory to keep")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="edgetp-planner-check-"))
    work.mkdir(parents=True, exist_ok=True)
    prompt, new, runs, probes = (16, 16, 2, 1) if args.quick else (32, 32, 5, 3)
    try:
        rows = run(work, QUICK_CONFIGS if args.quick else CONFIGS, prompt, new, runs, probes)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(rows))


def run(work: Path, configs: list, prompt: int, new: int, runs: int,
        probes: int) -> list[dict[str, Any]]:
    from edgetp.shard.split import split_checkpoint

    models = {d: write_model(work, _float(d)) for d in sorted({c[1] for c in configs})}
    config = load_model_config(next(iter(models.values())))
    probe_split = split_checkpoint(models[configs[0][1]], work / "split-probe", 2)
    raw = probe_profile(probe_split.out_dir, work / "profile.json", probes)
    profile = DeviceProfile.from_dict(raw)
    link = loopback_link()
    print(f"machine: {raw['cpu_count']} CPUs; probe (1 thread): matvec float32 "
          f"{raw['matvec_gbs']['float32']} GB/s, bfloat16 {raw['matvec_gbs']['bfloat16']} GB/s, "
          f"int8 {raw['matvec_gbs']['int8']} GB/s, "
          f"memory {raw['mem_bw_gbs']} GB/s, disk {raw['disk_bw_mbs']} MB/s, "
          f"{raw['layer_overhead_us']} us/layer, {raw['msg_overhead_us']} us/message "
          f"({raw['data_msg_overhead_us']} over the data link), runtime "
          f"{raw['runtime_rss'] / 2**20:.0f} MiB; loopback {link}")
    print(f"profile: the best figures of {probes} probe(s); workload: {prompt} prompt tokens, "
          f"{new} new tokens, context {CONTEXT}; {runs - 1} measured runs after a warm-up "
          "(the best run's median ms/token, the best TTFT); ratio = predicted / measured\n")
    header = (f"{'nodes':>5} {'dtype':>8} {'budget':>8} | {'ms/token pred':>13} {'meas':>7} "
              f"{'ratio':>5} | {'TTFT pred':>9} {'meas':>7} {'ratio':>5} | "
              f"{'peak MiB pred (max rank)':>24} {'meas':>6} {'ratio':>5} | streams/token")
    print(header)
    print("-" * len(header))
    rows = []
    for nodes, dtype, fraction in configs:
        budget = budget_for(config, nodes, dtype, fraction)
        split = work / f"split-{dtype}-{nodes}"
        split_checkpoint(models[dtype], split, nodes, dtype=dtype)
        load = os.getloadavg()[0]  # 1-minute average, before and after the run
        measured = measure(models[dtype], split, nodes, dtype, budget, prompt, new, runs)
        plan = predict(config, profile, link, nodes, dtype, budget, prompt, new)
        rows.append({**_row(nodes, dtype, budget, plan, measured),
                     "load": max(load, os.getloadavg()[0])})
        _print_row(rows[-1], nodes > (os.cpu_count() or 1))
    ratios = [r["ms_ratio"] for r in rows] + [r["peak_ratio"] for r in rows]
    inside = sum(1 for x in ratios if 0.75 <= x <= 1.25)
    print(f"\n{inside} of {len(ratios)} ms/token and peak-memory ratios are within 25%")
    loads = [r["load"] for r in rows]
    cores = os.cpu_count() or 1
    print(f"load average during the measurements: {min(loads):.1f} to {max(loads):.1f} on "
          f"{cores} cores" + ("; other processes were competing for the CPU, which slows the "
                              "measured runs (not the prediction)" if max(loads) > cores else ""))
    return rows


def _row(nodes: int, dtype: str, budget: int | None, plan: Any, measured: dict) -> dict:
    peaks_pred = [n.peak_rss for n in plan.nodes]
    return {"nodes": nodes, "dtype": dtype, "budget": budget,
            "ms_pred": plan.ms_per_token, "ms_meas": measured["ms_per_token"],
            "ms_ratio": plan.ms_per_token / measured["ms_per_token"],
            "ttft_pred": plan.ttft_s * 1e3, "ttft_meas": measured["ttft_ms"],
            "ttft_ratio": plan.ttft_s * 1e3 / measured["ttft_ms"],
            "peaks_pred": peaks_pred, "peaks_meas": measured["peaks"],
            "peak_ratio": max(peaks_pred) / max(measured["peaks"]),
            "streamed": max(n.streamed_bytes for n in plan.nodes),
            "bottleneck": plan.bottleneck()}


def _print_row(row: dict, shared: bool) -> None:
    budget = "-" if row["budget"] is None else f"{row['budget'] / 2**20:.0f}M"
    mib = 2**20
    print(f"{row['nodes']:>5} {row['dtype']:>8} {budget:>8} | {row['ms_pred']:>13.1f} "
          f"{row['ms_meas']:>7.1f} {row['ms_ratio']:>5.2f} | {row['ttft_pred']:>9.1f} "
          f"{row['ttft_meas']:>7.1f} {row['ttft_ratio']:>5.2f} | "
          f"{max(row['peaks_pred']) / mib:>24.0f} {max(row['peaks_meas']) / mib:>6.0f} "
          f"{row['peak_ratio']:>5.2f} | {row['streamed'] / mib:.0f} MiB"
          + ("  (nodes > cores: speeds scaled)" if shared else ""))
    per_rank = ", ".join(f"r{i} {p / mib:.0f}/{m / mib:.0f}" for i, (p, m) in
                         enumerate(zip(row["peaks_pred"], row["peaks_meas"], strict=True)))
    print(f"{'':>25}peak MiB predicted/measured per rank: {per_rank}")


if __name__ == "__main__":
    main()
