"""Quality of quantized weights and compressed activations, against float32 on the same model.

Run::

    .venv/bin/python benchmarks/quality.py [--quick] [--json]

Models: the bundled demo model (trained on one rule, so it has a known answer) and a tiny
random Llama from ``tests/helpers/hf_models.py`` (family ``llama3``: GQA, 2 layers, hidden 64). Each
is split for 2 nodes in every weight dtype (float32, bfloat16, int8, int4 with group 32),
and run as two ranks (threads of this process, :class:`~edgetp.net.collectives.InProcessGroup`
rounding partials and sums exactly as the star does) with every wire dtype (f32, bf16, int8).
Compute dtype float32 throughout (bfloat16 weights are bfloat16-rounded weights).

Reference: the unsplit float32 model. For a fixed set of prompts, the reference's greedy
continuation is fixed, and every configuration decodes prompt + continuation one token at a
time (the decode path, teacher-forced so positions line up). Over every position:

* max and mean absolute logit difference;
* mean KL(p_ref || p) of the next-token distributions (nats);
* greedy agreement: the fraction of positions whose argmax equals the reference's.

For the demo model, also the known answer: how many of its prompts a free-running greedy
generation answers exactly by the rule.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

import torch  # noqa: E402

from edgetp.model.checkpoint import load_model  # noqa: E402
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text  # noqa: E402
from edgetp.model.tokenizer import Tokenizer  # noqa: E402
from edgetp.net.collectives import InProcessGroup  # noqa: E402
from edgetp.parallel.loader import load_rank  # noqa: E402
from edgetp.shard.split import split_checkpoint  # noqa: E402

WEIGHTS = ("float32", "bfloat16", "int8", "int4")
WIRES = ("f32", "bf16", "int8")
DEMO_CASES = [(1, 80), (2, 7), (3, 5), (4, 0), (5, 11), (6, 3), (7, 20), (8, 1), (9, 9), (3, 96)]
MAX_SEQ_LEN = 128
NODES = 2


def run_ranks(models: list[torch.nn.Module], fn: Callable[[int, Any, Callable], Any]) -> Any:
    """``fn(rank, model, share)`` on every rank as threads; rank 0's result.

    ``share(value)`` returns rank 0's ``value`` on every rank (the others pass anything).
    """
    barrier = threading.Barrier(len(models), timeout=120)
    slot: list[Any] = [None]
    results: list[Any] = [None] * len(models)
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        def share(value: Any) -> Any:
            if rank == 0:
                slot[0] = value
            barrier.wait()
            out = slot[0]
            barrier.wait()  # nobody overwrites the slot before everyone has read it
            return out

        try:
            with torch.inference_mode():
                results[rank] = fn(rank, models[rank], share)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(r,), name=f"rank-{r}")
               for r in range(len(models))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results[0]


def decode_logits(models: list[Any], sequence: list[int]) -> torch.Tensor:
    """Teacher-forced decoding, one token per step: logits [len(sequence), vocab]."""
    def work(rank: int, model: Any, share: Callable) -> torch.Tensor:
        rows = []
        for pos, token in enumerate(sequence):
            h = share(model.embed(torch.tensor([token])) if rank == 0 else None)
            h = model.forward_layers(h, pos, range(model.config.num_hidden_layers))
            if rank == 0:
                rows.append(model.head(h)[0])
        return torch.stack(rows) if rank == 0 else None

    return run_ranks(models, work)


def generate(models: list[Any], prompt: list[int], steps: int, stop: set[int]) -> list[int]:
    """Free-running greedy continuation (up to ``steps`` tokens or a stop token)."""
    def work(rank: int, model: Any, share: Callable) -> list[int]:
        out: list[int] = []
        current, pos = torch.tensor(prompt), 0
        for _ in range(steps):
            h = share(model.embed(current) if rank == 0 else None)
            h = model.forward_layers(h, pos, range(model.config.num_hidden_layers))
            token = share(int(model.head(h[-1:])[0].argmax()) if rank == 0 else None)
            pos += current.numel()
            if token in stop:
                break
            out.append(token)
            current = torch.tensor([token])
        return out

    return run_ranks(models, work)


def metrics(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    diff = (got - ref).abs()
    log_p, log_q = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "kl": float(kl.mean()), "agree": float((ref.argmax(-1) == got.argmax(-1)).float()
                                                    .mean())}


def prompts_for(name: str, model_dir: Path, vocab: int, quick: bool) -> tuple[list, set[int]]:
    if name == "demo":
        tokenizer = Tokenizer.from_dir(model_dir)
        cases = DEMO_CASES[:4] if quick else DEMO_CASES
        return [tokenizer.encode(demo_prompt(*c)) for c in cases], set(tokenizer.eos_token_ids)
    gen = torch.Generator().manual_seed(1)
    count = 3 if quick else 8
    return [torch.randint(3, vocab, (12,), generator=gen).tolist() for _ in range(count)], set()


def evaluate(name: str, model_dir: Path, root: Path, quick: bool) -> dict[str, Any]:
    reference = load_model(model_dir, torch.float32, MAX_SEQ_LEN)
    prompts, stop = prompts_for(name, model_dir, reference.config.vocab_size, quick)
    steps = 40 if name == "demo" else 16
    sequences, ref_logits = [], []
    for prompt in prompts:
        continuation = generate([reference], prompt, steps, stop)
        sequences.append(prompt + continuation)
        ref_logits.append(decode_logits([reference], sequences[-1]))
    ref_all = torch.cat(ref_logits)
    rows: dict[str, Any] = {}
    for weights in WEIGHTS:
        split = split_checkpoint(model_dir, root / f"{name}-{weights}", NODES, dtype=weights)
        for wire in WIRES:
            group = InProcessGroup(NODES, wire=wire)
            models = [load_rank(d, group.communicator(r), max_seq_len=MAX_SEQ_LEN)
                      for r, d in enumerate(split.rank_dirs)]
            got = torch.cat([decode_logits(models, s) for s in sequences])
            row = metrics(ref_all, got)
            if name == "demo":
                row["known_answer"] = sum(
                    demo_answer(models, p, stop) == expected_text(*c)
                    for p, c in zip(prompts, DEMO_CASES, strict=False))
                row["cases"] = len(prompts)
            rows[f"{weights}/{wire}"] = row
            print(f"  {name} {weights}/{wire}: {row}", file=sys.stderr)
    return {"positions": int(ref_all.shape[0]), "rows": rows}


def demo_answer(models: list[Any], prompt: list[int], stop: set[int]) -> str:
    tokenizer = Tokenizer.from_dir(DEMO_MODEL_DIR)
    return tokenizer.decode(generate(models, prompt, 100, stop)).strip()


def report(results: dict[str, Any]) -> str:
    lines = []
    for name, data in results.items():
        lines += [f"### {name} ({data['positions']} positions, {NODES} nodes, vs float32 "
                  "unsplit)", "",
                  "| weights/wire | max abs logit diff | mean abs | mean KL (nats) | greedy "
                  "agreement |" + (" known answer |" if name == "demo" else ""),
                  "|---|---|---|---|---|" + ("---|" if name == "demo" else "")]
        for key, row in data["rows"].items():
            extra = f" {row['known_answer']}/{row['cases']} |" if name == "demo" else ""
            lines.append(f"| {key} | {row['max_abs']:.4f} | {row['mean_abs']:.5f} | "
                         f"{row['kl']:.2e} | {100 * row['agree']:.1f}% |{extra}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from helpers.hf_models import make_hf_model

    with tempfile.TemporaryDirectory(prefix="edgetp-quality-") as tmp:
        root = Path(tmp)
        tiny_dir, _ = make_hf_model(root / "hf", "llama3")
        results = {"demo": evaluate("demo", DEMO_MODEL_DIR, root, args.quick),
                   "tiny-llama3": evaluate("tiny-llama3", tiny_dir, root, args.quick)}
    print(json.dumps(results, indent=1) if args.json else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
