"""Sliding-window weight streaming: decode speed under a memory budget, against its bound.

Run::

    .venv/bin/python benchmarks/window.py [--quick] [--layers L] [--tokens N] [--threads T]
                                          [--dir DIR] [--no-checksums] [--ab-rounds R]
                                          [--json]

What it does, on one node (one process), through edgetp's real loading path
(:func:`~edgetp.shard.split.split_checkpoint` + :func:`~edgetp.parallel.loader.load_rank` with
``memory_budget``):

1. **Model.** Writes a seeded float32 Llama checkpoint tensor by tensor
   (:func:`edgetp.model.synthetic.write_model`: hidden 1024, MLP 4096,
   16 query / 4 KV heads, vocab 8000; 16 layers, ~1 GB, or 6 layers, ~430 MB, with
   ``--quick``) and splits it for one node.
2. **Disk.** Sequential read bandwidth of the shard's files with the page cache dropped first
   (``fsync`` then ``posix_fadvise(DONTNEED)`` on every file, 16 MiB ``preadv`` reads into
   one buffer; the median of 3 passes). On a virtual machine the "disk" may be a virtual disk
   backed by the host's page cache: the figure is what this guest sees, whatever is behind it.
3. **Compute.** Decode time per token with everything resident (no budget): the floor of any
   budgeted run.
4. **Bound.** With a budget that streams most blocks, ms/token next to the bound
   ``max(streamed bytes per token / disk bandwidth, resident compute time per token)`` -
   reading and computing perfectly overlapped - and the ratio, plus the window's overlap
   fraction (share of read time hidden behind compute) and its wait time per token.
5. **Sweep.** Budgets from the whole shard down to the minimum (100%, 75%, 50%, 25% and 0% of
   the way from the minimum to everything resident): ms/token, MB streamed per token,
   overlap, wait per token, and the ratio to the bound.
6. **Checksums.** The window checks every block it reads against the manifest's xxh3_64
   checksums, on a second thread while the reader reads on: ``check/tok`` is what the reader
   waited for the checks per token (part of ``read/tok``). ``--no-checksums`` runs everything
   without (a manifest stripped of its checksums, as an older edgetp wrote it);
   ``--ab-rounds R`` decodes at the headline budget with and without checksums in one process,
   alternating R rounds, the fairest comparison on a machine whose load drifts. The CPU's
   model and the vector and hashing extensions it has are printed first (xxh3 uses SSE2,
   AVX2 or AVX-512).

Before every budgeted run the page cache of the shard's files is dropped, so streamed blocks
come from the disk; the window drops what it reads as it goes. Timings use ``--threads``
torch threads (default 1, as ``edgetp worker`` processes run: the reader thread then has the
other core). The model is built in a temporary directory removed at the end, unless ``--dir``
names one to keep and reuse.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The repository's own edgetp first (as benchmarks/allreduce.py does).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from edgetp.model.synthetic import llama_config, write_model  # noqa: E402
from edgetp.parallel.comm import SoloCommunicator  # noqa: E402
from edgetp.parallel.loader import MemoryNeeds, load_rank, shard_memory_needs  # noqa: E402
from edgetp.shard.manifest import read_manifest  # noqa: E402
from edgetp.shard.split import split_checkpoint  # noqa: E402

MB = 1e6
MAX_SEQ_LEN = 256
PROMPT_LEN = 8
WARMUP_TOKENS = 2
READ_CHUNK = 16 << 20
SWEEP = (1.0, 0.75, 0.5, 0.25, 0.0)  # fraction of the way from the minimum to everything
HEADLINE = 0.1  # the bound is measured at minimum + 10%: most blocks stream
SEED = 0


def model_config(layers: int) -> dict[str, Any]:
    return llama_config(hidden=1024, intermediate=4096, layers=layers, heads=16, kv_heads=4,
                        vocab=8000)


def without_checksums(shard: Path) -> Path:
    """The same shard as an older edgetp wrote it: its files (hard links) and a manifest whose
    tensors have no checksums, so the window reads without checking."""
    bare = shard.parent.parent / "split-no-checksums" / shard.name
    shutil.rmtree(bare.parent, ignore_errors=True)
    bare.mkdir(parents=True)
    for path in shard_files(shard):
        try:
            os.link(path, bare / path.name)
        except OSError:
            shutil.copyfile(path, bare / path.name)
    manifest = json.loads((shard / "manifest.json").read_text())
    for file in manifest["files"].values():
        for entry in file["tensors"].values():
            entry.pop("xxh3_64", None)
            entry.pop("xxh3_64_chunk", None)
    (bare / "manifest.json").write_text(json.dumps(manifest))
    return bare


CPU_EXTENSIONS = ("sse2", "sse4_2", "avx", "avx2", "avx512f", "avx512bw", "avx512vl",
                  "avx512_vnni", "avx512_bf16", "sha_ni", "asimd", "sha2")


def cpu_description() -> str:
    """The CPU's model and which of the extensions hashing and kernels use it has (Linux)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    have = [name for name in CPU_EXTENSIONS if name in flags]
    return f"{model}; flags: {' '.join(have) or 'unknown'}"


def build_shard(root: Path, layers: int) -> Path:
    """rank-0 of a one-node split of the seeded model (reused when ``root`` already has it)."""
    config = model_config(layers)
    shard = root / "split" / "rank-0"
    if (shard / "manifest.json").is_file():
        manifest = read_manifest(shard)
        if manifest.model_config.num_hidden_layers == layers:
            return shard
        shutil.rmtree(root / "split")
    model_dir = write_model(root / "model", config, SEED)
    split_checkpoint(model_dir, root / "split", 1)
    shutil.rmtree(model_dir)
    return shard


# -- disk ----------------------------------------------------------------------------------------


def shard_files(shard: Path) -> list[Path]:
    return sorted(shard.glob("*.safetensors"))


def drop_page_cache(files: list[Path]) -> None:
    """Write back and evict the files' cached pages (DONTNEED skips dirty pages: fsync first)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_bandwidth(files: list[Path], passes: int = 3) -> float:
    """Median sequential read bandwidth (bytes/s) of ``files`` with a cold page cache."""
    buffer = memoryview(bytearray(READ_CHUNK))
    results = []
    for _ in range(passes):
        drop_page_cache(files)
        total, started = 0, time.perf_counter()
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                offset = 0
                while n := os.preadv(fd, [buffer], offset):
                    offset += n
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            total += offset
        results.append(total / (time.perf_counter() - started))
    return statistics.median(results)


# -- decoding -------------------------------------------------------------------------------------


@dataclass
class Run:
    label: str
    budget: int | None
    resident_mb: float  # weights held: pinned blocks + ring (or the whole shard)
    streamed_blocks: int
    blocks: int
    streamed_mb_per_token: float  # what the window read, per token
    ms_per_token: float
    bound_ms: float = 0.0
    ratio: float = 0.0
    overlap: float = 1.0
    wait_ms_per_token: float = 0.0
    read_ms_per_token: float = 0.0  # reader thread busy reading
    check_ms_per_token: float = 0.0  # of which checking checksums
    reader_mbps: float = 0.0  # the reader's own throughput while busy
    disk_mbps_before: float = 0.0  # sequential bandwidth measured just before this run


def decode(shard: Path, budget: int | None, tokens: int, label: str) -> Run:
    """Load ``shard`` with ``budget`` and time ``tokens`` greedy decode steps (median).

    The disk's bandwidth is measured again just before (one pass): the machine's load can
    drift between runs, and the bound uses the median of every measurement.
    """
    disk_mbps = disk_bandwidth(shard_files(shard), passes=1) / MB
    drop_page_cache(shard_files(shard))
    model = load_rank(shard, SoloCommunicator(), max_seq_len=MAX_SEQ_LEN, verify=False,
                      memory_budget=budget)
    window = model.window
    try:
        with torch.inference_mode():
            prompt = torch.randint(3, 8000, (PROMPT_LEN,),
                                   generator=torch.Generator().manual_seed(SEED))
            logits = model(prompt, 0)[-1]
            position = PROMPT_LEN
            for _ in range(WARMUP_TOKENS):
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
        ms = 1000 * statistics.median(times)  # robust to other processes' bursts
        if window is None:
            resident = sum(p.numel() * p.element_size() for p in model.parameters())
            return Run(label, budget, resident / MB, 0, 0, 0.0, ms, disk_mbps_before=disk_mbps)
        stats = window.take_stats()
        return Run(label, budget, window.resident_bytes / MB, len(window.streamed),
                   len(window.streamed) + len(window.pinned), stats.bytes_read / tokens / MB,
                   ms, overlap=stats.overlap, wait_ms_per_token=1000 * stats.wait_s / tokens,
                   read_ms_per_token=1000 * stats.read_s / tokens,
                   check_ms_per_token=1000 * stats.check_s / tokens,
                   reader_mbps=stats.bytes_read / stats.read_s / MB if stats.read_s else 0.0,
                   disk_mbps_before=disk_mbps)
    finally:
        if window is not None:
            window.close()
        del model


def checksum_ab(shard: Path, budget: int, tokens: int, rounds: int) -> dict[str, Any]:
    """Checked and unchecked reads at one budget in one process: two loads of the shard (with
    and without checksums), decoding ``tokens`` tokens in turn for ``rounds`` rounds each (the
    order flips every round; the page cache is dropped before each), so that the machine's
    drifting load falls on both alike. Medians of the per-token times, in ms."""
    variants = {"checked": shard, "unchecked": without_checksums(shard)}
    logging.getLogger("edgetp.parallel.loader").setLevel(logging.ERROR)
    models = {name: load_rank(path, SoloCommunicator(), max_seq_len=MAX_SEQ_LEN, verify=False,
                              memory_budget=budget) for name, path in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    check_s = 0.0
    try:
        with torch.inference_mode():
            prompt = torch.randint(3, 8000, (PROMPT_LEN,),
                                   generator=torch.Generator().manual_seed(SEED))
            state = {name: (model(prompt, 0)[-1], PROMPT_LEN) for name, model in models.items()}
            models["checked"].window.take_stats()
            for round_index in range(rounds):
                order = list(models) if round_index % 2 == 0 else list(reversed(models))
                for name in order:
                    drop_page_cache(shard_files(variants[name]))
                    logits, position = state[name]
                    for _ in range(tokens):
                        started = time.perf_counter()
                        logits = models[name](logits.argmax().view(1), position)[-1]
                        times[name].append(time.perf_counter() - started)
                        position += 1
                    state[name] = (logits, position)
            check_s = models["checked"].window.take_stats().check_s
    finally:
        for model in models.values():
            model.window.close()
    checked, unchecked = (1000 * statistics.median(times[n]) for n in ("checked", "unchecked"))
    return {"rounds": rounds, "tokens_per_round": tokens, "checked_ms_per_token": checked,
            "unchecked_ms_per_token": unchecked, "cost": checked / unchecked - 1,
            "check_wait_ms_per_token": 1000 * check_s / (rounds * tokens)}


def xxh3_gbps(nbytes: int = 64 << 20, passes: int = 5) -> float:
    """One core's xxh3_64 rate over a buffer larger than the caches (GB/s, best of passes)."""
    import xxhash

    data = memoryview(bytearray(os.urandom(1 << 20)) * (nbytes >> 20))
    best = min(_timed(lambda: xxhash.xxh3_64_intdigest(data)) for _ in range(passes))
    return nbytes / best / 1e9


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def with_bound(run: Run, disk_bps: float, compute_ms: float) -> Run:
    read_ms = 1000 * run.streamed_mb_per_token * MB / disk_bps
    run.bound_ms = max(read_ms, compute_ms)
    run.ratio = run.ms_per_token / run.bound_ms
    return run


def budget_at(needs: MemoryNeeds, fraction: float) -> int:
    """``fraction`` of the way from the minimum budget to everything resident."""
    return needs.minimum() + round(fraction * (needs.total - needs.minimum()))


# -- report ---------------------------------------------------------------------------------------


def table(runs: list[Run]) -> list[str]:
    lines = [f"{'budget':>13} {'resident':>9} {'streamed':>9} {'MB/token':>9} {'ms/token':>9} "
             f"{'bound':>7} {'ratio':>6} {'overlap':>8} {'wait/tok':>9} {'read/tok':>9} "
             f"{'check/tok':>9} {'reader':>10}"]
    for r in runs:
        reader = f"{r.reader_mbps:>5.0f}MB/s" if r.reader_mbps else "-"
        lines.append(
            f"{r.label:>13} {r.resident_mb:>7.0f}MB {r.streamed_blocks:>4}/{r.blocks:<4} "
            f"{r.streamed_mb_per_token:>9.1f} {r.ms_per_token:>9.1f} {r.bound_ms:>7.1f} "
            f"{r.ratio:>6.2f} {r.overlap:>8.2f} {r.wait_ms_per_token:>7.1f}ms "
            f"{r.read_ms_per_token:>7.1f}ms {r.check_ms_per_token:>7.2f}ms {reader:>10}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="6 layers (~430 MB), 6 tokens per budget: under a minute")
    parser.add_argument("--layers", type=int, help="decoder layers (default 16; 6 with --quick)")
    parser.add_argument("--tokens", type=int,
                        help="timed decode tokens per budget (default 16; 6 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--dir", type=Path, help="build (or reuse) the model here and keep it")
    parser.add_argument("--no-checksums", action="store_true",
                        help="read without checking checksums (a manifest without them, as "
                             "older splits have): the baseline of the checks' cost")
    parser.add_argument("--ab-rounds", type=int, default=0, metavar="R",
                        help="also decode at the headline budget with and without checksums in "
                             "one process, R alternating rounds each (the checks' cost)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    layers = args.layers or (6 if args.quick else 16)
    tokens = args.tokens or (6 if args.quick else 16)
    torch.set_num_threads(args.threads)
    say = (lambda *_: None) if args.json else print

    root = args.dir or Path(tempfile.mkdtemp(prefix="edgetp-window-bench-"))
    try:
        started = time.perf_counter()
        load_before = os.getloadavg()[0]
        shard = build_shard(root, layers)
        if args.no_checksums:
            shard = without_checksums(shard)
            logging.getLogger("edgetp.parallel.loader").setLevel(logging.ERROR)  # said once here
        files = shard_files(shard)
        shard_bytes = sum(p.stat().st_size for p in files)
        needs = shard_memory_needs(shard, max_seq_len=MAX_SEQ_LEN)
        say(f"model: {layers} layers, float32, shard {shard_bytes / MB:.0f} MB in {root} "
            f"(ready in {time.perf_counter() - started:.1f} s); {torch.get_num_threads()} "
            f"torch thread(s), {os.cpu_count()} CPUs, load average {load_before:.1f}")
        say(f"cpu: {cpu_description()}; reads checked against checksums: "
            f"{'no (--no-checksums)' if args.no_checksums else 'yes (xxh3_64)'}")
        say(f"budget range: minimum {needs.minimum() / MB:.0f} MB (KV cache and buffers "
            f"{needs.fixed / MB:.0f} MB + ring of 2 x {max(needs.blocks) / MB:.0f} MB) to "
            f"everything resident {needs.total / MB:.0f} MB")

        first_disk = [disk_bandwidth(files, passes=1) / MB for _ in range(3)]
        resident = decode(shard, None, tokens, "no budget")
        compute_ms = resident.ms_per_token
        headline = decode(shard, budget_at(needs, HEADLINE), tokens, "headline")
        sweep = []
        for fraction in SWEEP:
            budget = budget_at(needs, fraction)
            label = (f"{fraction:.0%}" if fraction else "min") + f" {budget / MB:.0f}MB"
            sweep.append(decode(shard, budget, tokens, label))
        ab = (checksum_ab(shard, budget_at(needs, HEADLINE), tokens, args.ab_rounds)
              if args.ab_rounds and not args.no_checksums else None)
        disks = first_disk + [r.disk_mbps_before for r in [resident, headline, *sweep]]
        disk_bps = statistics.median(disks) * MB
        for run in [headline, *sweep]:
            with_bound(run, disk_bps, compute_ms)
        load_after = os.getloadavg()[0]

        say(f"disk: sequential read of the shard's files, page cache dropped: median "
            f"{disk_bps / MB:.0f} MB/s over {len(disks)} passes (range {min(disks):.0f}-"
            f"{max(disks):.0f}); /work and /tmp may sit on a virtual disk: this is what the "
            "guest sees")
        say(f"compute: {compute_ms:.1f} ms/token with everything resident "
            f"({resident.resident_mb:.0f} MB of weights)")
        read_ms = 1000 * headline.streamed_mb_per_token * MB / disk_bps
        say(f"\nbudget {headline.budget / MB:.0f} MB streams {headline.streamed_blocks} of "
            f"{headline.blocks} blocks, {headline.streamed_mb_per_token:.1f} MB/token:")
        say(f"  {headline.ms_per_token:.1f} ms/token; bound max({read_ms:.1f} ms to read, "
            f"{compute_ms:.1f} ms to compute) = {headline.bound_ms:.1f} ms; ratio "
            f"{headline.ratio:.2f} ({'within' if headline.ratio <= 1.1 else 'NOT within'} 10%)")
        say(f"  overlap {headline.overlap:.2f} (share of read time hidden behind compute); "
            f"waited {headline.wait_ms_per_token:.1f} ms/token for reads")
        if headline.read_ms_per_token:
            say(f"  where the time goes: the reader was busy {headline.read_ms_per_token:.1f} "
                f"ms/token ({headline.read_ms_per_token / headline.ms_per_token:.0%} of the "
                f"token) at {headline.reader_mbps:.0f} MB/s, vs {disk_bps / MB:.0f} MB/s "
                f"sequential (x{disk_bps / MB / headline.reader_mbps:.2f})")
        if headline.check_ms_per_token:
            say(f"  checksums: the reader waited {headline.check_ms_per_token:.1f} ms/token "
                f"({headline.check_ms_per_token / headline.read_ms_per_token:.1%} of its time) "
                f"for the checks of its {headline.streamed_mb_per_token:.1f} MB, which run on a "
                "second thread while it reads on")
        if ab is not None:
            say(f"\nchecksums A/B at the headline budget, {ab['rounds']} alternating rounds of "
                f"{ab['tokens_per_round']} tokens each: checked {ab['checked_ms_per_token']:.1f} "
                f"ms/token, unchecked {ab['unchecked_ms_per_token']:.1f} ms/token "
                f"({ab['cost']:+.1%}); the reader waited {ab['check_wait_ms_per_token']:.1f} "
                f"ms/token for checks; xxh3_64 alone hashes {xxh3_gbps():.1f} GB/s on one core")
        say("\nsweep (budget: share of the way from the minimum to everything resident):")
        for line in table(sweep):
            say("  " + line)
        say(f"\ntotal {time.perf_counter() - started:.1f} s; load average {load_before:.1f} "
            f"before, {load_after:.1f} after"
            + (f" (busy machine: over {os.cpu_count()} CPUs, timings are noisy)"
               if max(load_before, load_after) > (os.cpu_count() or 1) else ""))
        if args.json:
            print(json.dumps({
                "layers": layers, "tokens": tokens, "threads": torch.get_num_threads(),
                "cpu": cpu_description(), "checksums": not args.no_checksums,
                "shard_bytes": shard_bytes, "disk_bytes_per_s": disk_bps,
                "disk_mbps_passes": disks, "compute_ms_per_token": compute_ms,
                "minimum_budget": needs.minimum(), "total_budget": needs.total,
                "load_average": [load_before, load_after], "headline": asdict(headline),
                "sweep": [asdict(r) for r in sweep], "checksum_ab": ab,
            }))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
