"""Quantized weights and compressed activations: ms/token and bytes per token, measured.

Run::

    .venv/bin/python benchmarks/quant.py [--quick] [--layers L] [--tokens N] [--dir DIR]
                                         [--no-wire] [--json]

1. **Model.** A seeded float32 Llama checkpoint (hidden 1024, MLP 2816, 16 query / 4 KV heads,
   4 layers: ~180 MB in float32, ~45 MB in int8; 2 layers with ``--quick``), written tensor by
   tensor by :func:`edgetp.model.synthetic.write_model`, with the demo model's tokenizer (vocabulary
   107) so a real cluster can run it.
2. **Weights.** Split for one node in float32, bfloat16, int8 and int4 (group 32): bytes on
   disk of the rank directory's weight files.
3. **Resident.** One process loads the rank with no budget and decodes greedily: median
   ms/token, weight bytes in memory. Compute dtype float32, except bfloat16 weights (computed
   in bfloat16, as ``--dtype bfloat16`` runs them).
4. **Streamed.** The same with the smallest budget (``MemoryNeeds.minimum()``): nearly every
   block streams from disk through the window each token (page cache dropped before the run
   and by the window as it reads): median ms/token, bytes read per token, weight bytes
   resident (pinned blocks + ring).
5. **Wire.** A 2-node :class:`~edgetp.runtime.local.LocalCluster` (real processes on loopback) with
   int8 weights and ``--wire-dtype`` f32, bf16, int8: bytes the master sent and received per
   decoded token (the prefill's traffic, measured separately, subtracted), and ms/token. The
   master's per-step hidden state to the workers stays float32 whatever the wire dtype; the
   partials and sums of every allreduce use it.

Every ratio is against float32 on the same model and the same machine. Timings are medians
over the generated tokens, and each format runs ``--rounds`` times interleaved with the
others, keeping its fastest round: on a shared machine a burst of someone else's work then
slows one round, not one format.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from edgetp.model.synthetic import llama_config, write_model  # noqa: E402
from edgetp.parallel.comm import SoloCommunicator  # noqa: E402
from edgetp.parallel.loader import load_rank, shard_memory_needs  # noqa: E402
from edgetp.shard.manifest import read_manifest  # noqa: E402
from edgetp.shard.split import split_checkpoint  # noqa: E402

MB = 1e6
FORMATS = ("float32", "bfloat16", "int8", "int4")
WIRES = ("f32", "bf16", "int8")
MAX_SEQ_LEN = 128
PROMPT_LEN = 8
SEED = 0


def model_config(layers: int) -> dict[str, Any]:
    """The demo tokenizer's vocabulary (107), so a real cluster can run the model."""
    return llama_config(hidden=1024, intermediate=2816, layers=layers, heads=16, kv_heads=4,
                        vocab=107, max_position_embeddings=1024)


def drop_page_cache(shard: Path) -> None:
    for path in shard.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_bytes(shard: Path) -> int:
    return sum(f.size for f in read_manifest(shard).files.values())


def decode_run(shard: Path, dtype: torch.dtype, budget: int | None, tokens: int) -> dict:
    """Greedy decoding on one node in this process: median ms/token and byte counts."""
    drop_page_cache(shard)
    model = load_rank(shard, SoloCommunicator(), dtype, MAX_SEQ_LEN, verify=False,
                      memory_budget=budget)
    window = model.window
    try:
        with torch.inference_mode():
            prompt = torch.randint(3, 107, (PROMPT_LEN,),
                                   generator=torch.Generator().manual_seed(SEED))
            logits = model(prompt, 0)[-1]
            position = PROMPT_LEN
            for _ in range(2):  # warm up
                logits = model(logits.argmax().view(1), position)[-1]
                position += 1
            if window is not None:
                window.take_stats()
            times = []
            for _ in range(tokens):
                started = time.perf_counter()
                logits = model(logits.argmax().view(1), position)[-1]
                times.append(time.perf_counter() - started)
                position += 1
        run = {"ms_per_token": 1000 * statistics.median(times)}
        if window is None:
            run["weight_bytes_resident"] = sum(p.numel() * p.element_size()
                                               for p in model.parameters())
            run["read_bytes_per_token"] = 0
        else:
            stats = window.take_stats()
            small = sum(p.numel() * p.element_size() for p in model.parameters())
            run["weight_bytes_resident"] = window.resident_bytes + small
            run["read_bytes_per_token"] = stats.bytes_read / tokens
            run["streamed_blocks"] = len(window.streamed)
            run["blocks"] = len(window.streamed) + len(window.pinned)
        return run
    finally:
        if window is not None:
            window.close()
        del model


def wire_run(model_dir: Path, root: Path, wire: str, tokens: int) -> dict:
    """A 2-node local cluster with int8 weights: master traffic per token and ms/token."""
    from edgetp.config.generation import GenerationConfig, SamplingConfig
    from edgetp.runtime.local import LocalCluster

    os.environ.setdefault("EDGETP_CACHE", str(root / "cache"))
    cluster = LocalCluster(model_dir, 2, max_seq_len=MAX_SEQ_LEN, wire_dtype=wire,
                           timeout_s=60.0, split_dir=root / "wire-split", weight_dtype="int8")
    with cluster as master:
        prompt = list(range(3, 3 + PROMPT_LEN))
        master.engine.generate(prompt, SamplingConfig(), GenerationConfig(  # warm up
            max_new_tokens=tokens, stop_on_eos=False))
        traffic = master.runner.transport.traffic
        moved = []
        for new_tokens in (1, tokens):  # the prefill alone, then prefill + decode
            before = traffic.bytes_sent + traffic.bytes_received
            result = master.engine.generate(prompt, SamplingConfig(), GenerationConfig(
                max_new_tokens=new_tokens, stop_on_eos=False))
            moved.append(traffic.bytes_sent + traffic.bytes_received - before)
    return {"ms_per_token": result.ms_per_token,
            "wire_bytes_per_token": (moved[1] - moved[0]) / (tokens - 1),
            "prefill_wire_bytes_per_token": moved[0] / PROMPT_LEN}


def measure(root: Path, layers: int, tokens: int, wire: bool, rounds: int) -> dict[str, Any]:
    model_dir = root / "model"
    if not (model_dir / "model.safetensors").is_file():
        write_model(model_dir, model_config(layers), SEED)
    out: dict[str, Any] = {"layers": layers, "rounds": rounds, "formats": {}, "wire": {}}
    shards = {}
    for fmt in FORMATS:
        split = split_checkpoint(model_dir, root / f"split-{fmt}", 1, dtype=fmt, force=True)
        shards[fmt] = split.rank_dirs[0]
        out["formats"][fmt] = {"disk_bytes": disk_bytes(shards[fmt])}
    for _ in range(rounds):  # formats interleaved; the best round of each is kept
        for fmt, shard in shards.items():
            dtype = torch.bfloat16 if fmt == "bfloat16" else torch.float32
            minimum = shard_memory_needs(shard, dtype, MAX_SEQ_LEN).minimum()
            row = out["formats"][fmt]
            for mode, budget in (("resident", None), ("streamed", minimum)):
                run = decode_run(shard, dtype, budget, tokens)
                if mode not in row or run["ms_per_token"] < row[mode]["ms_per_token"]:
                    row[mode] = run
            print(f"  {fmt}: resident {row['resident']['ms_per_token']:.1f} ms/token, streamed "
                  f"{row['streamed']['ms_per_token']:.1f} ms/token", file=sys.stderr)
    if wire:
        for name in WIRES:
            out["wire"][name] = wire_run(model_dir, root, name, tokens)
            print(f"  wire {name}: {out['wire'][name]['wire_bytes_per_token']:.0f} B/token",
                  file=sys.stderr)
    return out


def report(data: dict[str, Any]) -> str:
    base = data["formats"]["float32"]
    lines = [f"synthetic Llama, {data['layers']} layers, hidden 1024, MLP 2816; torch "
             f"{torch.__version__}, {torch.get_num_threads()} thread(s); median ms/token of "
             f"the best of {data['rounds']} interleaved round(s)", "",
             "| weights | disk MB | resident ms/token (x f32) | resident weight MB | "
             "streamed ms/token (x f32) | read MB/token | streamed resident MB |",
             "|---|---|---|---|---|---|---|"]
    for fmt, row in data["formats"].items():
        res, st = row["resident"], row["streamed"]
        lines.append(
            f"| {fmt} | {row['disk_bytes'] / MB:.1f} | {res['ms_per_token']:.1f} "
            f"({res['ms_per_token'] / base['resident']['ms_per_token']:.2f}x) | "
            f"{res['weight_bytes_resident'] / MB:.1f} | {st['ms_per_token']:.1f} "
            f"({st['ms_per_token'] / base['streamed']['ms_per_token']:.2f}x) | "
            f"{st['read_bytes_per_token'] / MB:.1f} | {st['weight_bytes_resident'] / MB:.1f} |")
    if data["wire"]:
        f32 = data["wire"]["f32"]["wire_bytes_per_token"]
        lines += ["", "2 nodes, int8 weights, master traffic per generated token:", "",
                  "| wire | bytes/token (x f32) | ms/token |", "|---|---|---|"]
        for name, row in data["wire"].items():
            lines.append(f"| {name} | {row['wire_bytes_per_token']:.0f} "
                         f"({row['wire_bytes_per_token'] / f32:.2f}x) | "
                         f"{row['ms_per_token']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, fewer tokens")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--dir", type=Path, default=None, help="keep the model and splits here")
    parser.add_argument("--no-wire", action="store_true", help="skip the 2-node wire runs")
    parser.add_argument("--rounds", type=int, default=None,
                        help="runs per format, interleaved; the fastest is kept (default 3)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as edgetp worker processes run
    layers = args.layers or (2 if args.quick else 4)
    tokens = args.tokens or (8 if args.quick else 24)
    root = args.dir or Path(tempfile.mkdtemp(prefix="edgetp-quant-"))
    try:
        rounds = args.rounds or (1 if args.quick else 3)
        data = measure(root, layers, tokens, not args.no_wire, rounds)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(data, indent=1) if args.json else report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
