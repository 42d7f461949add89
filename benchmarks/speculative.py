"""Speculative decoding against link latency: tokens/s with and without drafts.

Run::

    .venv/bin/python benchmarks/speculative.py [--nodes 2,4] [--profiles none,tpi-llm,home-wifi]
                                               [--new-tokens N] [--runs N] [--draft-tokens K]
                                               [--real-model GGUF_OR_DIR] [--quick] [--json]

For each node count and link profile a local cluster starts on loopback (the master in this
process, each worker an ``edgetp worker`` process, one torch thread each, the master too),
with the profile's latency as the transport's send delay (``edgetp.perf.bench.link_emulation``:
no tc on loopback, so bandwidth is not limited). On it, each workload runs plain and
speculative, alternating run by run so load that comes and goes hits both alike; greedy, so
both must give the same tokens (checked):

* ``demo pair``: the demo model with its draft model (``edgetp/model/demo_draft``) on a counting
  prompt, where the draft is nearly always right;
* ``demo lookup``: the demo model with ``--draft lookup`` counting by 2 after a prompt that
  counts by 3, so lookup keeps proposing the 3-steps and the model rejects them: the cost of
  drafts that fail (K adapts down and rests);
* ``real lookup``: with ``--real-model`` (default: the tests' SmolLM2-135M GGUF when it is in
  the cache), ``--draft lookup`` on a summarisation-style chat prompt.

Per point: tokens/s (generated tokens over decode time, the prompt's step excluded; the median
over runs), the ratio speculative / plain, the acceptance rate (drafted tokens kept) and the
mean tokens per decode step. The issue's targets: >= 2x on home-wifi for the demo pair, >= 1.3x
for lookup on the real model, and never below 0.95x when drafts are rejected. ``--quick``: 2
nodes, none and home-wifi, fewer tokens, one run. Progress goes to stderr; ``--json`` prints one
JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from edgetp.config.generation import GenerationConfig, SamplingConfig  # noqa: E402
from edgetp.model.demo import DEMO_DRAFT_DIR, DEMO_MODEL_DIR, demo_prompt  # noqa: E402
from edgetp.perf.bench import link_emulation  # noqa: E402
from edgetp.runtime.engine import GenerationResult  # noqa: E402
from edgetp.runtime.local import LocalCluster  # noqa: E402
from edgetp.runtime.master import Master, Prompt  # noqa: E402
from edgetp.runtime.speculation import Speculation  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from window import cpu_description  # noqa: E402  (benchmarks/window.py: the CPU and its flags)

REAL_MODEL = Path.home() / ".cache" / "edgetp" / "test-models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
ARTICLE = (
    "The city council met on Tuesday to discuss the new bicycle lanes on Main Street. The "
    "lanes, which opened in March, have been used by more than two thousand riders a day. "
    "Shop owners on Main Street said that the lanes took away parking spaces and that their "
    "sales fell in the first month. The council agreed to add a new parking garage behind the "
    "library and to keep the bicycle lanes on Main Street for one more year. The mayor said "
    "that the city will count riders and shoppers again next spring before it decides whether "
    "the bicycle lanes on Main Street stay."
)
# counting by 2 after counting by 3: lookup proposes the 3-steps that follow 7, 13, 19, ...
# and the model rejects them (the cost of drafts that fail)
MISLEADING = "count by 3 : 1 4 7 10 13 16 19 22 25 28 31 34 37 40 43 46 49 count by 2 : 1"
SUMMARY_REQUEST = f"Summarize this article in three sentences.\n\n{ARTICLE}"
TARGETS = {"demo pair": 2.0, "real lookup": 1.3}  # on home-wifi
NEVER_SLOWER = 0.95


@dataclass(frozen=True)
class Workload:
    name: str
    model: str  # "demo" or "real"
    draft: str
    prompt: Prompt


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def workloads(real_model: Path | None) -> list[Workload]:
    counting = Prompt(demo_prompt(1, 2))  # 97 numbers to go
    out = [Workload("demo pair", "demo", str(DEMO_DRAFT_DIR), counting),
           Workload("demo lookup", "demo", "lookup", Prompt(MISLEADING))]
    if real_model is not None:
        out.append(Workload("real lookup", "real", "lookup", Prompt(SUMMARY_REQUEST, chat=True)))
    return out


def timed(master: Master, workload: Workload, speculation: Speculation | None,
          new_tokens: int) -> GenerationResult:
    master.engine.speculation = speculation
    gen = GenerationConfig(max_new_tokens=new_tokens, stop_on_eos=False)
    return master.generate(workload.prompt, SamplingConfig(), gen)


def tokens_per_s(result: GenerationResult) -> float:
    return 1000.0 / result.ms_per_token if result.ms_per_token else 0.0


def measure(master: Master, workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """Plain and speculative runs, alternating, after one warm-up of each; the speculative
    runs share one drafter and its measured step costs (as a server's requests do)."""
    master.use_draft(workload.draft, args.draft_tokens)
    speculation = master.engine.speculation  # one drafter and its measured costs, as a server
    plain, fast = [], []
    for run in range(args.runs + 1):
        a = timed(master, workload, None, args.new_tokens)
        b = timed(master, workload, speculation, args.new_tokens)
        if a.token_ids != b.token_ids:
            raise SystemExit(f"{workload.name}: speculative tokens differ from plain ones:\n"
                             f"  plain: {a.text!r}\n  spec:  {b.text!r}")
        if run > 0:
            plain.append(a)
            fast.append(b)
    stats = [r.speculation for r in fast if r.speculation is not None]
    drafted, kept = sum(s.drafted for s in stats), sum(s.accepted for s in stats)
    steps = sum(s.steps for s in stats)
    decoded = sum(len(r.decode_ms) for r in fast)
    plain_tps = statistics.median(tokens_per_s(r) for r in plain)
    spec_tps = statistics.median(tokens_per_s(r) for r in fast)
    return {"workload": workload.name, "plain_tokens_per_s": plain_tps,
            "spec_tokens_per_s": spec_tps, "ratio": spec_tps / plain_tps,
            "acceptance": kept / drafted if drafted else 0.0,
            "tokens_per_step": decoded / steps if steps else 1.0,
            "drafted": drafted, "kept": kept, "tokens": len(fast[0].token_ids)}


def run_point(model_dir: Path, nodes: int, profile: str, loads: list[Workload],
              args: argparse.Namespace) -> list[dict[str, Any]]:
    with link_emulation(profile), LocalCluster(model_dir, nodes, max_seq_len=512,
                                               timeout_s=60.0) as master:
        out = []
        for workload in loads:
            started = time.perf_counter()
            row = {"nodes": nodes, "profile": profile, **measure(master, workload, args)}
            log(f"  {nodes} nodes, {profile:9s} {workload.name:12s} plain "
                f"{row['plain_tokens_per_s']:6.1f} tok/s, spec {row['spec_tokens_per_s']:6.1f} "
                f"tok/s = {row['ratio']:.2f}x; kept {row['acceptance']:.0%} of drafts, "
                f"{row['tokens_per_step']:.2f} tokens/step ({time.perf_counter() - started:.0f} s)")
            out.append(row)
        return out


def verdict(row: dict[str, Any]) -> str:
    target = TARGETS.get(row["workload"]) if row["profile"] == "home-wifi" else None
    if target is not None:
        return f"target {target}x: {'met' if row['ratio'] >= target else 'MISSED'}"
    if row["workload"] == "demo lookup":
        ok = row["ratio"] >= NEVER_SLOWER
        return f"target >= {NEVER_SLOWER}x (rejected drafts): {'met' if ok else 'MISSED'}"
    return ""


def report(rows: list[dict[str, Any]], cpu: str) -> str:
    lines = [f"CPU: {cpu}", "",
             "| nodes | link | workload | plain tok/s | spec tok/s | ratio | kept | tokens/step "
             "| target |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['nodes']} | {r['profile']} | {r['workload']} | "
                     f"{r['plain_tokens_per_s']:.1f} | {r['spec_tokens_per_s']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['acceptance']:.0%} | {r['tokens_per_step']:.2f} | "
                     f"{verdict(r)} |")
    return "\n".join(lines)


def real_model_dir(source: str | None) -> Path | None:
    """The real model's directory (a .gguf is converted once, into the cache), or None."""
    path = Path(source) if source else REAL_MODEL
    if source is None and not path.is_file():
        log(f"no real model ({REAL_MODEL} is not there; give --real-model): lookup on the "
            "demo model only")
        return None
    if path.suffix.lower() != ".gguf":
        return path
    from edgetp.shard.gguf_cache import model_dir_for

    def no_progress(_name: str, _done: int, _total: int) -> None:
        return None

    return model_dir_for(path, no_progress, log)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="2,4")
    parser.add_argument("--profiles", default="none,tpi-llm,home-wifi")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--draft-tokens", type=int, default=8)
    parser.add_argument("--real-model", default=None,
                        help="a .gguf or model directory for the lookup workload (default: the "
                             "tests' SmolLM2-135M if cached); 'none' to skip it")
    parser.add_argument("--quick", action="store_true",
                        help="2 nodes, none and home-wifi, 32 tokens, one run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.nodes, args.profiles, args.new_tokens, args.runs = "2", "none,home-wifi", 32, 1
    return args


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> None:
    args = parse_args(argv)
    cpu = cpu_description()
    log(f"CPU: {cpu}")
    torch.set_num_threads(1)  # the master as each worker: one torch thread (the draft runs here)
    real = None if args.real_model == "none" else real_model_dir(args.real_model)  # cached
    with tempfile.TemporaryDirectory(prefix="edgetp-spec-") as tmp:
        os.environ["EDGETP_CACHE"] = str(Path(tmp) / "cache")  # the splits
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        loads = workloads(real)
        models = {"demo": DEMO_MODEL_DIR, "real": real}
        rows: list[dict[str, Any]] = []
        for nodes in (int(n) for n in args.nodes.split(",")):
            for profile in args.profiles.split(","):
                for kind in dict.fromkeys(w.model for w in loads):
                    model_dir = models[kind]
                    assert model_dir is not None
                    log(f"{kind} model, {nodes} nodes, link {profile} ...")
                    rows += run_point(Path(model_dir), nodes, profile,
                                      [w for w in loads if w.model == kind], args)
    text = report(rows, cpu)
    if args.json:
        out(json.dumps({"cpu": cpu, "rows": rows}))
        log(text)
    else:
        out(text)


if __name__ == "__main__":
    main()
