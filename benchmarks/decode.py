"""Decode speed against the memory-bandwidth floor, beside the systems users would pick instead.

Run::

    .venv/bin/python benchmarks/decode.py [--nodes 1,2] [--dtypes float32,bfloat16,int8,int4]
                                          [--runs N] [--new-tokens N] [--keep DIR] [--json]
                                          [--tiny] [--secure] [--paired]
                                          [--one-thread float32]
                                          [--dllama DISTRIBUTED_LLAMA_CHECKOUT]

1. **Model.** A TinyLlama-1.1B-shaped Llama with random weights (hidden 2048, MLP 5632, 22
   layers, 32 query / 4 KV heads, vocab 32000, untied head; float32, 4.4 GB), written seeded
   by :func:`edgetp.model.synthetic.write_model` into the work directory. ``--keep DIR`` keeps the
   directory (model, splits, reports) and reuses whatever it already holds; without it a
   temporary one is removed at the end. ``--tiny``: the same family at hidden 256, MLP 704,
   2 layers, 8 / 2 heads, vocab 512 (runs end to end in well under a minute).
2. **Bandwidth.** This machine's own streaming test, after the model is written and before
   any node loads: the native streaming reader (``csrc/stream.c`` through
   ``edgetp.kernels.native.stream_read``: independent vector accumulators as wide as the CPU
   has; torch's sum where the native kernels are off) over a 256 MiB buffer (8x the L3 cache)
   on one thread, in one process, then one stream per process in 2 (and, with more cores, as
   many as the cores) processes at once; the sustained rate of the best of 3 rounds (all the
   streams' bytes over the time from the first start to the last end, so streams the scheduler
   happened to run one after the other do not count double). The same for each weight dtype's
   matrix-vector product as edgetp computes it on one thread (``edgetp.kernels.native``' C
   decode kernels through ``edgetp.parallel.qlinear.int8_product`` / ``int4_product``, or
   torch's where they are unavailable) over copies of one MLP-shaped weight, 256 MiB in all,
   and on every core in one process (the products' thread pool): what the kernel streams
   alone, against the reader's rate.
3. **Runs.** For each node count and weight dtype: split as ``edgetp split --dtype`` does
   (int4: group 32), then :func:`edgetp.perf.bench.run_bench` (a
    :class:`~edgetp.runtime.local.LocalCluster`:
   the master in this process, each worker an ``edgetp worker`` process on loopback, with the
   default threads a user gets: the machine's cores divided among the nodes): 8-token prompt,
   ``--new-tokens`` generated tokens with no early stop, one warm-up, ``--runs`` runs; ms/token
   is the median over runs of each run's mean. Weights in bfloat16 are computed in bfloat16;
   every other dtype in float32. ``--one-thread DTYPES`` (default float32) also runs one node
   on one thread, for the speedup of all cores over one. With 2 among ``--nodes``, every dtype
   also runs on one node with the threads each node of the 2-node cluster has (one on a 2-core
   machine): one device alone, against which the 2-node point is the second device's gain.
   On the same cluster, after the decode runs: the time to first token of a
   ``--prefill-tokens`` prompt (256; one warm-up, the median of two runs).
4. **Floor.** Bytes a node reads per token: every tensor of its layer files (linear weights,
   their scales, norms) plus, on the master, ``head.safetensors`` (final norm, lm_head); not the
   embedding table, of which one row is read. Floor ms/token = the slowest node's bytes over
   its read bandwidth: S streams at once, S the threads of all the nodes together, each node
   getting its threads' share of their total rate (one node on every core: all of it; two nodes
   of one thread each: half of two streams' rate), measured again just before and just after
   the point's runs, the floor taking the mean of the two: on the development VMs the rate of
   two concurrent streams moves by 10% (on some, between about 16 and 26 GB/s each) over
   minutes, so a rate from minutes earlier can be far off. Ratio = measured / floor.
5. **Outside matmuls and allreduce waits.** edgetp's spans time whole decoder layers, the head
   and each allreduce, not single matmuls. So *outside* = the master's (rank 0's) ms/token -
   (layer + head time) - allreduce wait, from the bench report's breakdown (embedding row,
   final norm, step broadcast, Python glue between layers). The report files the master's
   lm_head in the master's compute (its step span holds the head). What layers do
   besides reading their weights (norms, RoPE, attention, activations, matmul kernels slower
   than the stream) shows as *above floor* = rank 0's layer + head time - its own bytes /
   bandwidth. A missed target's "why" line adds up rank 0's parts and gives the kernel's own
   rate next to the plain read's.
6. **Reading, for the scaling targets.** The 2 nodes against one device (``--paired``: the
   median round) and every core against one thread: the ratio split into rank 0's computing
   and its waiting, and each side's read rate while computing (each rank's bytes over its
   compute time; the ranks of a cluster added up). Their quotient is what the memory bus
   gave the many streams over the one in those very runs, so a missed target says whether
   its bus gain fell short (two streams on one machine share one memory bus) or its waiting
   grew, and what gain the target needs with that waiting.

``--dllama DIR``: after each float32 and int4 point, distributed-llama (a checkout the
user built in ``DIR``) runs the same model with the same nodes and threads per node, and a
table sets the two side by side (:mod:`distributed_llama`, beside this script).

``--paired``: after each 2-node point, one device alone (one node with the threads each of
the two nodes has) and the 2 nodes again, both loaded at once and their runs alternating
(device, 2 nodes, device, ...), with the memory bus measured before each round: the read rate
of one device's streams and of both nodes' together. On one machine the two nodes share that
bus, so a round's 2-vs-1 ratio can only beat one device by as much as the bus gives two
streams over one; runs minutes apart may fall in different phases of a host whose memory rate
moves. The 2-vs-1 targets then take the median of the rounds' ratios. Both clusters' weights
are in memory at once (twice the model), and so is the *bare split*
(:mod:`edgetp.perf.split_probe`, twice the layers again): the same model's layer products and
head, random weights in the same dtype, computed by one process against two processes holding
a rank's slices each, meeting at a spinning barrier after each layer half; no runtime (no
messages, norms, attention or Python but a loop). One bare round (6 tokens each side) runs
before each round of the clusters, after the bus is measured. Its ratio is what splitting the
products gains on this machine's memory bus at that moment, the ceiling of the 2-vs-1 ratio
here; the 2-vs-1 target's reading gives it beside the cluster's.

``--secure``: after each point of more than one node, the same cluster with CURVE keys (the
allreduce over the sealed data link, edgetp.net.sealedlink) and without run side by side,
their runs alternating, so load that comes and goes hits both alike; a table gives both
ms/token and their ratio against the target (keys within :data:`SECURE_TARGET` of the plain run).

It then prints the reference figures beside these, and the targets of issue 26 (1 node on
every core at least 1.5x faster than on one thread in float32; 2 nodes at most 0.6x the
ms/token of one node of the same device (one node alone with the threads each of the two has)
in float32, 0.7x in the other dtypes; 2 nodes float32 within 1.15x of the floor; int4's time
to first token no longer than int8's on one node, and 2 nodes' at most 0.65x one device's in
every dtype), each
met or missed by how much, the CPU's flags and kernel paths, and how much of the CPUs other
processes used meanwhile (from ``/proc/stat``: on a shared machine that is what disturbs the
timings). Progress goes to
stderr; ``--json`` prints one JSON object on stdout and the human report on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's own edgetp (as benchmarks/allreduce.py does)

import torch  # noqa: E402
from distributed_llama import (  # noqa: E402
    WEIGHT_TYPES,
    DistributedLlama,
    PeerFailed,
    check_checkout,
)

from edgetp.config.model import load_model_config  # noqa: E402
from edgetp.core.pages import pack  # noqa: E402
from edgetp.kernels import native  # noqa: E402
from edgetp.kernels.threads import local_cluster_threads  # noqa: E402
from edgetp.model.synthetic import (  # noqa: E402
    WEIGHTS_FILE,
    ProgressFn,
    llama_config,
    model_bytes,
    write_model,
)
from edgetp.perf.bench import BenchSettings, bench_cluster, write_reports  # noqa: E402
from edgetp.perf.bench import measure as measure_on  # noqa: E402
from edgetp.perf.split_probe import (  # noqa: E402
    SplitProbe,
    product,
    step_rows,
    stored,
    summary,
)
from edgetp.perf.streams import (  # noqa: E402
    read_buffer,
    read_rates,
    reader_name,
    round_rate,
    run_streams,
    timed_span,
)
from edgetp.runtime.local import split_cache_dir  # noqa: E402
from edgetp.shard.manifest import read_manifest  # noqa: E402
from edgetp.shard.split import expected_files, split_checkpoint  # noqa: E402

GB = 1e9
MiB = 1 << 20
SEED = 0
PROMPT_TOKENS = 8
PREFILL_NEW_TOKENS = 2  # the prefill runs: a first token and one more
PREFILL_RUNS = 2
GROUP_SIZE = 32
DTYPES = ("float32", "bfloat16", "int8", "int4")
OUTSIDE_METHOD = ("outside = time outside matmuls and allreduce waits, as far as edgetp's spans "
                  "tell: they time whole layers, so it is rank 0's ms/token - layer and head "
                  "time - allreduce wait (embedding row, final norm, step broadcast, Python "
                  "glue); the norms, RoPE, attention and activations inside layers are in "
                  "'above floor' = rank 0's layer and head time - its bytes / bandwidth, with "
                  "the matmul kernels' shortfall from the stream rate")
REFERENCE_BANDWIDTH = "16 GB/s on one core, 32 GB/s on two (floor ~275 / ~140 ms/token)"
# (system, nodes, weights, ms/token, edgetp weights to compare with, in order of preference)
REFERENCE = (
    ("transformers, single process", 1, "fp32", 291.0, ("float32",)),
    ("TPI-LLM reference", 2, "fp32", 320.0, ("float32",)),
    ("TPI-LLM reference, memory window 2", 2, "fp32", 1879.0, ("float32",)),
    ("distributed-llama", 1, "fp32", 316.0, ("float32",)),
    ("distributed-llama", 2, "fp32", 198.0, ("float32",)),
    ("distributed-llama", 1, "q40 (4-bit w, 8-bit act)", 165.0, ("int4", "int8")),
    ("distributed-llama", 2, "q40 (4-bit w, 8-bit act)", 103.0, ("int4", "int8")),
)
# (name, nodes, weights, measured figure, limit): "ratio" to the floor (at most), "vs1" the
# ms/token against one node's of the same device (at most: the node alone with the threads each
# of the cluster's nodes has), "speedup" of one node on every core over one thread (at least)
TARGETS = (
    ("1 node on every core >= 1.5x one thread, float32", 1, "float32", "speedup", 1.5),
    ("2 nodes <= 0.6x 1 node of the same device, float32", 2, "float32", "vs1", 0.6),
    ("2 nodes <= 0.7x 1 node of the same device, bfloat16", 2, "bfloat16", "vs1", 0.7),
    ("2 nodes <= 0.7x 1 node of the same device, int8", 2, "int8", "vs1", 0.7),
    ("2 nodes <= 0.7x 1 node of the same device, int4", 2, "int4", "vs1", 0.7),
    ("2 nodes float32 <= 1.15x floor", 2, "float32", "ratio", 1.15),
    ("int4 prefill <= int8 prefill (time to first token, 1 node)", 1, "int4", "ttft_int8", 1.0),
    *((f"2 nodes time to first token <= 0.65x 1 node of the same device, {w}", 2, w,
       "ttft_vs1", 0.65) for w in ("float32", "bfloat16", "int8", "int4")),
)
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "avx_vnni", "amx_tile", "asimd", "asimddp", "sve", "i8mm", "bf16")

SECURE_TARGET = 1.05  # --secure: ms/token with keys at most this times the plain run's

_started = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _started:7.1f} s] {message}", file=sys.stderr, flush=True)


def model_config(tiny: bool) -> dict[str, Any]:
    if tiny:
        return llama_config(hidden=256, intermediate=704, layers=2, heads=8, kv_heads=2,
                            vocab=512)
    return llama_config(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4,
                        vocab=32000)


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds every process here has used since boot, from /proc/stat; CPU seconds of
    this process and its reaped children): their difference over a stretch is other people's."""
    with open("/proc/stat") as handle:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, handle.readline().split()[1:8])
    times = os.times()
    return ((user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"),
            times.user + times.system + times.children_user + times.children_system)


def cpu_facts() -> dict[str, Any]:
    """The CPU: its model, the vector flags the kernels care about, the kernels' paths."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": native.usable_cores(),
            "flags": [f for f in CPU_FLAGS if f in flags], "kernel_paths": native.kernel_paths(),
            "stream_reader": reader_name()}


def others_share(before: tuple[float, float], wall_s: float) -> float:
    """The fraction of the machine's CPU capacity that other processes used since ``before``."""
    busy, ours = cpu_seconds()
    others = (busy - before[0]) - (ours - before[1])
    return max(0.0, others) / (wall_s * (os.cpu_count() or 1))


# -- the model ----------------------------------------------------------------------------------


def ensure_model(root: Path, config: dict[str, Any]) -> Path:
    """``root/model``: reused when it holds this config's complete checkpoint, else written."""
    model_dir = root / "model"
    weights, config_file = model_dir / WEIGHTS_FILE, model_dir / "config.json"
    if (weights.is_file() and weights.stat().st_size == model_bytes(config)
            and config_file.is_file() and json.loads(config_file.read_text()) == config):
        progress(f"model: reusing {model_dir}")
        return model_dir
    total = model_bytes(config)
    progress(f"model: writing {total / GB:.2f} GB of seeded float32 weights to {model_dir}")
    partial = root / "model.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    report = every_tenth(total, "model: written") if total > 256 * MiB else None
    write_model(partial, config, SEED, report)
    os.replace(partial, model_dir)
    return model_dir


def every_tenth(total: int, label: str) -> ProgressFn:
    """A progress callback (done, total) printing each further tenth of ``total``."""
    shown = [0]

    def report(done: int, _total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth > shown[0]:
            shown[0] = tenth
            progress(f"{label} {done / GB:.2f} / {total / GB:.2f} GB")

    return report


def split_for(model_dir: Path, nodes: int, weights: str) -> list[Path]:
    """The split a LocalCluster would use (its cache directory), made here with progress."""
    out = split_cache_dir(model_dir, nodes, None, weights, 0, GROUP_SIZE)
    files = expected_files(load_model_config(model_dir), nodes)
    big = (model_dir / WEIGHTS_FILE).stat().st_size > 256 * MiB
    count = [0]

    def one_file(_path: str, _size: int) -> None:
        count[0] += 1
        if big and (count[0] % max(1, files // 5) == 0 or count[0] == files):
            progress(f"split {nodes} node(s) {weights}: {count[0]}/{files} files")

    result = split_checkpoint(model_dir, out, nodes, None, weights, progress=one_file,
                              group_size=GROUP_SIZE, force=True)  # as LocalCluster does
    progress(f"split {nodes} node(s) {weights}: {'reused' if result.skipped else 'written'} "
             f"in {out}")
    return result.rank_dirs


def read_bytes_per_token(rank_dir: Path) -> int:
    """Bytes this rank reads per decoded token: its layer files and head, not the embedding."""
    manifest = read_manifest(rank_dir)
    total = 0
    for name, entry in manifest.files.items():
        tied = (name == "embed.safetensors" and manifest.model_config.tie_word_embeddings
                and manifest.dtype not in ("int8", "int4"))  # the head is the embedding
        if name != "embed.safetensors" or tied:
            total += sum(t.offsets[1] - t.offsets[0] for t in entry.tensors.values())
    return total


# -- memory bandwidth ---------------------------------------------------------------------------


def _kernels(dtypes: list[str], nbytes: int, shape: tuple[int, int]
             ) -> dict[str, tuple[Callable[[int], object], int]]:
    """name -> (call i, bytes it reads): the streaming reader over ``nbytes`` ("read"), and per
    weight dtype the matrix-vector product decode runs (``[1, in] x [out, in]^T`` as edgetp's
    linears compute it) cycling over copies of one weight, ``nbytes`` in all (beyond the cache).
    """
    w = torch.randn(shape, generator=torch.Generator().manual_seed(SEED)).mul_(0.02)
    buffer = read_buffer(nbytes)  # [N] float32
    def read(_i: int) -> object:
        return native.stream_read(buffer) if native.available() else buffer.sum()

    out: dict[str, tuple[Callable[[int], object], int]] = {"read": (read, buffer.numel() * 4)}
    for dtype in dtypes:
        weight = stored(dtype, w, GROUP_SIZE)
        size = sum(t.numel() * t.element_size() for t in weight)
        copies = [product(dtype, tuple(pack(weight)), *step_rows(dtype, *shape), GROUP_SIZE)
                  for _ in range(max(1, nbytes // size))]
        out[dtype] = (lambda i, c=copies: c[i % len(c)](), size)
    return out


def _stream_child(index: int, counts: list[int], dtypes: list[str], nbytes: int,
                  shape: tuple[int, int], seconds: float, rounds: int, barrier: Any,
                  out: Any) -> None:
    """Stream ``index`` (a spawned process): per kernel, count of streams and round, the
    (start, end, bytes) of its stream when ``index < count`` (else it idles at the barrier),
    on one thread; then stream 0 alone on every core (``name/all``: the products' pool, one
    node on the whole machine). Times are CLOCK_MONOTONIC, shared by the processes."""
    torch.set_num_threads(1)
    native.set_threads(1)
    spans: dict[str, list[tuple[float, float, int]]] = {}
    kernels = _kernels(dtypes, nbytes, shape)
    for name, (kernel, size) in kernels.items():
        kernel(0)
        for streams in counts:
            for _ in range(rounds):
                barrier.wait()  # the streams of a round start together
                if index < streams:
                    spans.setdefault(f"{name}/{streams}", []).append(
                        timed_span(kernel, size, seconds))
    native.set_threads(None)
    for name, (kernel, size) in kernels.items():
        if name == "read":
            continue
        for _ in range(rounds):
            barrier.wait()
            if index == 0:
                spans.setdefault(f"{name}/all", []).append(timed_span(kernel, size, seconds))
    out.put(spans)


def measure_rates(counts: list[int], dtypes: list[str], nbytes: int, shape: tuple[int, int],
                  seconds: float, rounds: int = 3) -> dict[str, float]:
    """Total bytes/s of each kernel: ``"read/N"`` with N streams at once (N processes, one
    thread each; the best round's :func:`round_rate`), ``"float32/all"`` in one process on
    every core."""
    results = run_streams(_stream_child, max(counts),
                          (counts, dtypes, nbytes, shape, seconds, rounds),
                          300 + 4 * (len(dtypes) + 1) * len(counts) * rounds * seconds)
    keys = {key for r in results for key in r}
    return {key: max(round_rate([r[key][i] for r in results if key in r])
                     for i in range(rounds)) for key in keys}


def stream_counts() -> list[int]:
    """Streams measured at once: 1, 2 (two nodes of one thread), and one per core."""
    return sorted({1, 2, native.usable_cores()})


def bandwidth(config: dict[str, Any], dtypes: list[str], tiny: bool) -> dict[str, Any]:
    nbytes, seconds = (128 * MiB, 0.1) if tiny else (256 * MiB, 0.5)
    shape = (config["intermediate_size"], config["hidden_size"])
    counts = stream_counts()
    progress(f"bandwidth: {nbytes // MiB} MiB per stream, {', '.join(map(str, counts))} "
             f"concurrent streams ({reader_name()}); matrix-vector kernels of "
             f"{', '.join(dtypes)}, one thread per stream, then every core in one process")
    rates = measure_rates(counts, dtypes, nbytes, shape, seconds)
    cores = native.usable_cores()
    return {"buffer_bytes": nbytes, "kernel_shape": list(shape), "reader": reader_name(),
            "cores": cores,
            "read_gbps_1": rates["read/1"] / GB,
            "read_gbps_2_per_stream": rates["read/2"] / 2 / GB,
            "read_gbps_2_total": rates["read/2"] / GB,
            "read_gbps_cores_total": rates[f"read/{cores}"] / GB,
            "kernel_gbps_1": {d: rates[f"{d}/1"] / GB for d in dtypes},
            "kernel_gbps_2_per_stream": {d: rates[f"{d}/2"] / 2 / GB for d in dtypes},
            "kernel_gbps_all_cores": {d: rates[f"{d}/all"] / GB for d in dtypes}}


def node_threads(nodes: int, threads: int | None) -> list[int]:
    """Each node's threads: ``threads`` each, else the defaults (the cores divided)."""
    if threads is not None:
        return [threads] * nodes
    return local_cluster_threads(native.usable_cores(), nodes)


def device_threads(cluster_threads: list[int]) -> int | None:
    """The threads of one node alone as one of a cluster's devices (the cluster's workers each
    have a device's share of the machine): the point to compare the cluster with. None: that
    is the whole machine (the default point)."""
    share = cluster_threads[-1]
    return None if share == native.usable_cores() else share


def probe_size(tiny: bool) -> tuple[int, float]:
    """Bytes per stream and seconds per round of a read-rate probe between runs."""
    return (128 * MiB, 0.1) if tiny else (256 * MiB, 0.5)


def node_rates_now(threads: list[int], tiny: bool) -> list[float]:
    """Each node's read rate (GB/s) now: as many streams at once as the nodes' threads
    together, each node its threads' share (the best of three rounds)."""
    streams = sum(threads)
    total = read_rates([streams], *probe_size(tiny))[streams] / GB
    return [total * t / streams for t in threads]


# -- runs ---------------------------------------------------------------------------------------


def kernel_rate(bw: dict[str, Any], weights: str, threads: list[int]) -> float:
    """GB/s the dtype's kernel alone streams on one node of ``threads`` (the slowest's)."""
    if len(threads) == 1:
        return bw["kernel_gbps_1" if threads[0] == 1 else "kernel_gbps_all_cores"][weights]
    return bw["kernel_gbps_2_per_stream"][weights]  # nodes of one thread each (this machine)


def point_settings(model_dir: Path, nodes: int, weights: str, args: argparse.Namespace,
                   threads: int | None) -> BenchSettings:
    """The bench settings of one point: the workload, weights in bfloat16 computed in bfloat16
    and every other dtype in float32, ``threads`` per node (None: the defaults)."""
    compute = "bfloat16" if weights == "bfloat16" else "float32"
    return BenchSettings(str(model_dir), nodes, None, PROMPT_TOKENS, args.new_tokens,
                         args.runs, 1, dtype=compute, timeout_s=120.0,
                         weight_dtype=weights, group_size=GROUP_SIZE, threads=threads,
                         max_seq_len=max(PROMPT_TOKENS + args.new_tokens,
                                         args.prefill_tokens + PREFILL_NEW_TOKENS) + 8)


def run_point(model_dir: Path, nodes: int, weights: str, args: argparse.Namespace,
              bw: dict[str, Any], out_dir: Path, threads: int | None = None) -> dict[str, Any]:
    """One node count and weight dtype (``threads`` per node, None: the defaults): the bench,
    its floor and its breakdown."""
    rank_dirs = split_for(model_dir, nodes, weights)
    settings = point_settings(model_dir, nodes, weights, args, threads)
    compute = settings.dtype
    per_node = node_threads(nodes, threads)
    label = f"{nodes} node(s) {weights} threads {'+'.join(map(str, per_node))}"
    progress(f"run {label}: load, 1 warm-up + {args.runs} run(s) of {args.new_tokens} tokens")
    before = node_rates_now(per_node, args.tiny)  # this VM's bandwidth drifts by 10% within
    report, ttft = run_decode_and_prefill(settings, out_dir, args.prefill_tokens)
    after = node_rates_now(per_node, args.tiny)  # minutes: the floor takes the mean of the two
    rates = [(b + a) / 2 for b, a in zip(before, after, strict=True)]
    gc.collect()  # the master's shard goes before the next point loads its own
    runs = [run["ms_per_token"] for run in report["runs"]]
    ms = statistics.median(runs)
    bytes_by_rank = [read_bytes_per_token(d) for d in rank_dirs]
    floor_ms = max(b / (r * GB) for b, r in zip(bytes_by_rank, rates, strict=True)) * 1000
    gbps = max(bytes_by_rank) / GB / (floor_ms / 1000)  # the rate the floor amounts to
    kernel_floor_ms = max(bytes_by_rank) / (kernel_rate(bw, weights, per_node) * GB) * 1000
    point = {"nodes": nodes, "weights": weights, "compute_dtype": compute,
             "threads": threads, "node_threads": per_node,
             "ms_per_token": ms, "run_ms_per_token": runs, "floor_ms": floor_ms,
             "ratio": ms / floor_ms, "bandwidth_gbps": gbps, "node_read_gbps": rates,
             "node_read_gbps_before": before, "node_read_gbps_after": after,
             "kernel_floor_ms": kernel_floor_ms, "kernel_ratio": ms / kernel_floor_ms,
             "read_bytes_per_token": bytes_by_rank,
             "node_breakdown": [breakdown(node, bytes_by_rank[node["rank"]],
                                          rates[node["rank"]])
                                for node in report["nodes"]],
             "report_dir": str(out_dir), "prefill_tokens": args.prefill_tokens, **ttft}
    point["outside_ms"] = point["node_breakdown"][0]["other_ms"]
    point["compute_read_gbps"] = point_side(point).read_gbps()
    progress(f"run {label}: {ms:.1f} ms/token (runs "
             f"{', '.join(f'{r:.1f}' for r in runs)}), floor {floor_ms:.1f} (read GB/s per "
             f"node before {before[0]:.1f}, after {after[0]:.1f})")
    if args.secure and nodes > 1:
        point["secure"] = run_secure(settings)
    if args.paired and nodes == 2 and threads is None:
        point["paired"] = run_paired(model_dir, weights, args)
    return point


def run_decode_and_prefill(settings: BenchSettings, out_dir: Path, prefill_tokens: int
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """On one cluster: the decode workload (its report written to ``out_dir``, as
    ``run_bench`` does), then time to first token of a ``prefill_tokens`` prompt (one warm-up,
    PREFILL_RUNS runs, the median; 0: not measured)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with bench_cluster(settings) as master:
        report, nodes = measure_on(master, settings, None)
        write_reports(report, nodes, {n["rank"]: n["host"] for n in report["nodes"]}, out_dir)
        if not prefill_tokens:
            return report, {"ttft_ms": None, "run_ttft_ms": []}
        progress(f"run {settings.nodes} node(s) {settings.weight_dtype}: time to first token "
                 f"of a {prefill_tokens}-token prompt")
        prefill = replace(settings, prompt_tokens=prefill_tokens,
                          new_tokens=PREFILL_NEW_TOKENS, repeat=PREFILL_RUNS, warmup=1)
        runs = [run["ttft_ms"] for run in measure_on(master, prefill, None)[0]["runs"]]
    return report, {"ttft_ms": statistics.median(runs), "run_ttft_ms": runs}


def alternating_runs(first: BenchSettings, second: BenchSettings, rounds: int,
                     before_round: Callable[[], dict[str, Any]] | None = None
                     ) -> list[dict[str, Any]]:
    """Both clusters up at once and one run of each per round (first, second, first, ...; a
    warm-up of each before the first round), so load and memory phases that come and go hit
    both alike. Per round: each run's ms/token, rank 0's allreduce wait and every rank's
    compute (``first_ms``, ``first_allreduce_ms``, ``first_compute_ms``, ``second_...``),
    after what ``before_round`` measured."""
    out = []
    with bench_cluster(first) as one, bench_cluster(second) as two:
        for round_ in range(rounds):
            row = dict(before_round()) if before_round else {}
            for key, master, settings in (("first", one, first), ("second", two, second)):
                report, _ = measure_on(master, replace(settings, repeat=1,
                                                       warmup=1 if round_ == 0 else 0), None)
                row[f"{key}_ms"] = report["runs"][0]["ms_per_token"]
                row[f"{key}_allreduce_ms"] = \
                    report["nodes"][0]["breakdown_ms_per_token"]["allreduce"]
                row[f"{key}_compute_ms"] = [n["breakdown_ms_per_token"]["compute"] for n in
                                            sorted(report["nodes"], key=lambda n: n["rank"])]
            out.append(row)
    gc.collect()
    return out


def run_secure(settings: BenchSettings) -> dict[str, Any]:
    """The point with CURVE keys against the same without, their runs alternating
    (:func:`alternating_runs`): the medians, their ratio and rank 0's allreduce wait."""
    progress(f"run {settings.nodes} node(s) {settings.weight_dtype}, plain and with keys "
             f"alternating: load both, 1 warm-up + {settings.repeat} run(s) each")
    rounds = alternating_runs(settings, replace(settings, secure=True), settings.repeat)
    plain = [r["first_ms"] for r in rounds]
    keyed = [r["second_ms"] for r in rounds]
    plain_ms, ms = statistics.median(plain), statistics.median(keyed)
    progress(f"run {settings.nodes} node(s) {settings.weight_dtype}: {plain_ms:.1f} ms/token "
             f"plain, {ms:.1f} with keys ({ms / plain_ms:.3f}x)")
    return {"ms_per_token": ms, "run_ms_per_token": keyed, "plain_ms_per_token": plain_ms,
            "plain_run_ms_per_token": plain, "ratio": ms / plain_ms,
            "allreduce_ms": statistics.median(r["second_allreduce_ms"] for r in rounds),
            "plain_allreduce_ms": statistics.median(r["first_allreduce_ms"] for r in rounds)}


def bus_rates(device: int, cluster: int, tiny: bool) -> dict[str, float]:
    """The memory bus now: the total read rate (GB/s) of one device's streams (its threads)
    and of the cluster's (every node's threads at once), and their quotient, the most a second
    device on the same bus can add (the best of three rounds each)."""
    rates = read_rates(sorted({device, cluster}), *probe_size(tiny))
    one, every = rates[device] / GB, rates[cluster] / GB
    return {"device_streams_gbps": one, "cluster_streams_gbps": every, "bus_factor": every / one}


def run_paired(model_dir: Path, weights: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """``--paired``: one device alone (one node with a 2-node cluster's threads per node)
    against the 2-node cluster, both up at once and their runs alternating, the bus measured
    before each round. None where one node of a cluster's threads is the whole machine."""
    cluster = node_threads(2, None)
    device = device_threads(cluster)
    if device is None:
        return None
    progress(f"run 1 device ({device} thread(s)) and 2 nodes of {weights}, alternating: load "
             f"both and the bare split, 1 warm-up + {args.runs} run(s) each, a bare round "
             "before each")
    config = load_model_config(model_dir)
    with SplitProbe(config, weights, 2, device, GROUP_SIZE) as bare:
        def before_round() -> dict[str, Any]:
            row = dict(bus_rates(device, sum(cluster), args.tiny))
            row["bare_device_ms"], row["bare_split_ms"] = bare.round()
            return row

        rounds = alternating_runs(point_settings(model_dir, 1, weights, args, device),
                                  point_settings(model_dir, 2, weights, args, None), args.runs,
                                  before_round)
    device_bytes = [read_bytes_per_token(d) for d in split_for(model_dir, 1, weights)]
    cluster_bytes = [read_bytes_per_token(d) for d in split_for(model_dir, 2, weights)]
    for r in rounds:
        r["ratio"] = r["second_ms"] / r["first_ms"]
        r["bare_ratio"] = r["bare_split_ms"] / r["bare_device_ms"]
        r["reading"] = scaling_parts(Side(r["second_ms"], r["second_compute_ms"], cluster_bytes),
                                     Side(r["first_ms"], r["first_compute_ms"], device_bytes))
    result = {"device_threads": device,
              "device_ms_per_token": statistics.median(r["first_ms"] for r in rounds),
              "ms_per_token": statistics.median(r["second_ms"] for r in rounds),
              "ratio": statistics.median(r["ratio"] for r in rounds), "rounds": rounds,
              "bare_split": summary([(r["bare_device_ms"], r["bare_split_ms"]) for r in rounds])}
    each = ", ".join(f"{r['ratio']:.2f} (bare {r['bare_ratio']:.2f})" for r in rounds)
    progress(f"run 1 device and 2 nodes of {weights}: {result['device_ms_per_token']:.1f} and "
             f"{result['ms_per_token']:.1f} ms/token, 2 vs 1 {result['ratio']:.2f}x (rounds "
             f"{each})")
    return result


def run_peer(peer: DistributedLlama, model_dir: Path, point: dict[str, Any],
             args: argparse.Namespace) -> dict[str, Any]:
    """distributed-llama on ``point``'s model, nodes and threads per node, ``--runs`` times."""
    weights, threads = point["weights"], point["node_threads"]
    label = f"distributed-llama {point['nodes']} node(s) {WEIGHT_TYPES[weights][0]} threads " \
            f"{'+'.join(map(str, threads))}"
    row: dict[str, Any] = {"nodes": point["nodes"], "node_threads": threads, "weights": weights,
                           "dllama_weights": WEIGHT_TYPES[weights][0],
                           "edgetp_ms_per_token": point["ms_per_token"],
                           "ms_per_token": None, "run_ms_per_token": [], "error": None}
    try:
        progress(f"run {label}: {args.runs} run(s) of {args.new_tokens} tokens")
        for _ in range(args.runs):
            row["run_ms_per_token"].append(
                peer.ms_per_token(model_dir, weights, threads, args.new_tokens))
        row["ms_per_token"] = statistics.median(row["run_ms_per_token"])
        progress(f"run {label}: {row['ms_per_token']:.1f} ms/token")
    except (PeerFailed, OSError) as exc:  # OSError: its programs would not start
        row["error"] = str(exc)
        progress(f"run {label}: failed: {exc}")
    return row


def dllama_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["", "distributed-llama beside edgetp (this run, the same model; each right after "
             "edgetp's point, with its nodes and threads per node)", "",
             "| nodes | threads | weights (edgetp / dllama) | edgetp ms/token | dllama ms/token "
             "| runs | edgetp / dllama |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, theirs = r["edgetp_ms_per_token"], r["ms_per_token"]
        lines.append(
            f"| {r['nodes']} | {'+'.join(map(str, r['node_threads']))} | {r['weights']} / "
            f"{r['dllama_weights']} | {ours:.1f} | "
            + (f"{theirs:.1f} | {', '.join(f'{x:.1f}' for x in r['run_ms_per_token'])} | "
               f"{ours / theirs:.2f} |" if theirs else "failed | - | - |"))
    lines += [f"  {r['nodes']} node(s) {r['dllama_weights']}: {r['error']}"
              for r in rows if r["error"]]
    for w, one, two in peer_scaling(rows):
        ours = two["edgetp_ms_per_token"] / one["edgetp_ms_per_token"]
        lines.append(f"  2 nodes vs 1 device, {w}: edgetp {ours:.2f}x, distributed-llama "
                     f"{two['ms_per_token'] / one['ms_per_token']:.2f}x")
    return lines


def peer_scaling(rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(weights, 1-device row, 2-node row) where both ran: one node with a 2-node cluster's
    threads per node, against that cluster."""
    out = []
    for two in (r for r in rows if r["nodes"] == 2 and r["ms_per_token"]):
        one = next((r for r in rows if r["nodes"] == 1 and r["weights"] == two["weights"]
                    and r["node_threads"] == two["node_threads"][:1] and r["ms_per_token"]),
                   None)
        if one is not None:
            out.append((two["weights"], one, two))
    return out


def secure_table(points: list[dict[str, Any]]) -> list[str]:
    """Plain against keyed runs (--secure): ms/token, ratio, the target."""
    rows = [p for p in points if "secure" in p]
    if not rows:
        return []
    lines = ["", f"with keys (CURVE, the sealed data link) against without: both clusters up "
             f"at once, runs alternating; target: at most {SECURE_TARGET:.2f}x", "",
             "| nodes | weights | plain ms/token | with keys ms/token | ratio | rank 0 allreduce "
             "wait, plain / keys | target |", "|---|---|---|---|---|---|---|"]
    for p in rows:
        keyed = p["secure"]
        verdict = "met" if keyed["ratio"] <= SECURE_TARGET else (
            f"missed by {100 * (keyed['ratio'] / SECURE_TARGET - 1):.1f}%")
        lines.append(f"| {p['nodes']} | {p['weights']} | {keyed['plain_ms_per_token']:.1f} | "
                     f"{keyed['ms_per_token']:.1f} | {keyed['ratio']:.3f} | "
                     f"{keyed['plain_allreduce_ms']:.1f} / {keyed['allreduce_ms']:.1f} | "
                     f"{verdict} |")
    return lines


def breakdown(node: dict[str, Any], nbytes: int, gbps: float) -> dict[str, Any]:
    """One node's per-token parts (ms) from the bench report (the master's step span holds its
    lm_head: compute) and its own floor."""
    parts = node["breakdown_ms_per_token"]
    floor_ms = nbytes / (gbps * GB) * 1000
    compute = parts["compute"]
    return {"rank": node["rank"], "compute_ms": compute,
            "allreduce_ms": parts["allreduce"], "read_wait_ms": parts["read_wait"],
            "other_ms": parts["other"], "floor_ms": floor_ms,
            "above_floor_ms": compute - floor_ms, "peak_rss_bytes": node.get("peak_rss_bytes", 0)}


# -- targets and reference ----------------------------------------------------------------------


def paired_table(points: list[dict[str, Any]]) -> list[str]:
    """--paired: each round's bus and the two runs; the 2-vs-1 targets take the median ratio."""
    rows = [p for p in points if p.get("paired")]
    if not rows:
        return []
    lines = ["", "2 nodes against one device, both up at once and their runs alternating "
             "(--paired; the 2-vs-1 targets use the median of these rounds' ratios). Bus: the "
             "read rate of one device's streams and of both nodes' at once, measured before "
             "each round; on one machine a second node gains at most their quotient. Bare "
             "split: the same products alone, one process against two, right before the "
             "round (edgetp.perf.split_probe)", "",
             "| weights | round | bus: 1 device GB/s | 2 nodes GB/s | bus factor | 1 device "
             "ms/token | 2 nodes ms/token | 2 vs 1 | read gain while computing | bare split: "
             "1 / 2 ms/token | bare 2 vs 1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in rows:
        paired = p["paired"]
        for i, r in enumerate(paired["rounds"], 1):
            lines.append(f"| {p['weights']} | {i} | {r['device_streams_gbps']:.1f} | "
                         f"{r['cluster_streams_gbps']:.1f} | {r['bus_factor']:.2f}x | "
                         f"{r['first_ms']:.1f} | {r['second_ms']:.1f} | {r['ratio']:.2f}x | "
                         f"{r['reading']['gain']:.2f}x | {r['bare_device_ms']:.1f} / "
                         f"{r['bare_split_ms']:.1f} | {r['bare_ratio']:.2f}x |")
        bare = paired["bare_split"]
        lines.append(f"| {p['weights']} | median | | | | {paired['device_ms_per_token']:.1f} | "
                     f"{paired['ms_per_token']:.1f} | {paired['ratio']:.2f}x | | "
                     f"{statistics.median(bare['device_ms']):.1f} / "
                     f"{statistics.median(bare['split_ms']):.1f} | {bare['ratio']:.2f}x |")
    return lines


def find(points: list[dict[str, Any]], nodes: int, weights: str,
         threads: int | None = None) -> dict[str, Any] | None:
    """The point of ``nodes`` and ``weights`` run with ``threads`` (None: the defaults)."""
    return next((p for p in points if p["nodes"] == nodes and p["weights"] == weights
                 and p["threads"] == threads), None)


def target_value(kind: str, points: list[dict[str, Any]], nodes: int,
                 weights: str) -> tuple[float | None, dict[str, Any] | None]:
    """A target's measured figure (None: a point it needs was not run) and its point."""
    point = find(points, nodes, weights)
    if point is None:
        return None, None
    if kind == "ratio":
        return point["ratio"], point
    if kind == "ms":
        return point["ms_per_token"], point
    if kind == "ttft_int8":
        other = find(points, 1, "int8")
        ttfts = (point.get("ttft_ms"), other and other.get("ttft_ms"))
        return (ttfts[0] / ttfts[1] if ttfts[0] and ttfts[1] else None), point
    if kind == "vs1" and point.get("paired"):
        return point["paired"]["ratio"], point  # the alternating runs: the same bus phases
    other = find(points, 1, weights, threads=1 if kind == "speedup" else
                 device_threads(point["node_threads"]))
    if other is None:
        return None, point
    if kind == "speedup":
        return other["ms_per_token"] / point["ms_per_token"], point
    figure = "ttft_ms" if kind == "ttft_vs1" else "ms_per_token"
    if not point.get(figure) or not other.get(figure):
        return None, point
    return point[figure] / other[figure], point


def targets(points: list[dict[str, Any]], bw: dict[str, Any],
            tiny: bool) -> list[dict[str, Any]]:
    out = []
    for name, nodes, weights, kind, limit in TARGETS:
        value, point = target_value(kind, points, nodes, weights)
        row: dict[str, Any] = {"name": name, "nodes": nodes, "weights": weights, "kind": kind,
                               "limit": limit, "value": None, "missed_by_pct": None}
        if value is None or point is None:
            row["status"] = "not run"
        elif kind == "ms" and tiny:
            row["status"] = "n/a (--tiny model)"
        else:
            row["value"] = value
            # "speedup" is at least its limit, every other figure at most
            missed = 100 * (limit / value - 1 if kind == "speedup" else value / limit - 1)
            row["missed_by_pct"] = max(0.0, missed)
            row["status"] = "met" if missed <= 0 else f"missed by {missed:.0f}%"
            row["why"] = None if missed <= 0 or kind.startswith("ttft") else why(point, bw)
            reading = scaling_reading(kind, points, point)
            if reading is not None:
                row["reading"] = reading
                row["bus"] = bus_reason(reading, kind, limit)
            bare = (point.get("paired") or {}).get("bare_split") if kind == "vs1" else None
            if bare is not None:
                row["bare_split_ratio"] = bare["ratio"]
                row["bus"] = "; ".join(filter(None, (row.get("bus"), bare_reason(bare))))
        out.append(row)
    return out


@dataclass(frozen=True)
class Side:
    """One side of a scaling comparison: its ms/token, each rank's compute ms/token (the
    products and the small ops between them, the master's head included) and bytes read."""

    ms_per_token: float
    compute_ms: list[float]
    read_bytes: list[int]

    def read_gbps(self) -> list[float]:
        """Each rank's read rate while computing: its bytes over its compute time."""
        return [b / GB / (ms / 1000) if ms > 0 else 0.0
                for b, ms in zip(self.read_bytes, self.compute_ms, strict=True)]


def point_side(point: dict[str, Any]) -> Side:
    return Side(point["ms_per_token"], [n["compute_ms"] for n in point["node_breakdown"]],
                point["read_bytes_per_token"])


def scaling_parts(many: Side, one: Side) -> dict[str, float]:
    """Where ``many`` (the 2 nodes, or every core) stands against ``one`` (one device, or one
    thread): their ratio split into rank 0's computing and its waiting (allreduce, read,
    outside), as fractions of one's ms/token, and the read rates while computing: one's
    rank, many's ranks together, and their quotient, the gain the memory bus gave."""
    one_gbps, many_gbps = sum(one.read_gbps()), sum(many.read_gbps())
    return {"ratio": many.ms_per_token / one.ms_per_token,
            "computing": many.compute_ms[0] / one.ms_per_token,
            "waiting": (many.ms_per_token - many.compute_ms[0]) / one.ms_per_token,
            "one_gbps": one_gbps, "many_gbps": many_gbps,
            "gain": many_gbps / one_gbps if one_gbps else 0.0}


def scaling_reading(kind: str, points: list[dict[str, Any]], point: dict[str, Any]
                    ) -> dict[str, float] | None:
    """A scaling target's :func:`scaling_parts`: ``vs1`` the 2 nodes against one device (the
    median round of ``--paired``'s, where it ran), ``speedup`` every core against one thread;
    None for the other targets or without the point compared with."""
    if kind == "vs1" and point.get("paired"):
        rounds = sorted(point["paired"]["rounds"], key=lambda r: r["ratio"])
        return rounds[(len(rounds) - 1) // 2].get("reading")
    if kind not in ("vs1", "speedup"):
        return None
    threads = 1 if kind == "speedup" else device_threads(point["node_threads"])
    other = find(points, 1, point["weights"], threads=threads)
    return None if other is None else scaling_parts(point_side(point), point_side(other))


def bus_reason(reading: dict[str, float], kind: str, limit: float) -> str:
    """The measured reason a scaling figure is what it is: how much more the memory bus gave
    the many streams than the one while they computed, and what the target needs of it."""
    target = 1 / limit if kind == "speedup" else limit  # as a ratio many / one
    many = "every core" if kind == "speedup" else "the 2 nodes"
    one = "one thread" if kind == "speedup" else "one device"
    text = (f"{reading['ratio']:.2f}x = {reading['computing']:.2f}x computing + "
            f"{reading['waiting']:.2f}x waiting (rank 0's allreduce, read and outside time); "
            f"while computing {many} read {reading['many_gbps']:.1f} GB/s together, "
            f"{reading['gain']:.2f}x the {reading['one_gbps']:.1f} GB/s of {one} alone")
    room = target - reading["waiting"]
    if room <= 0:
        return text + f"; the waiting alone is past {target:.2f}x"
    needed = reading["gain"] * reading["computing"] / room
    return text + f"; {target:.2f}x with this waiting needs a bus gain of {needed:.2f}x"


def bare_reason(probe: dict[str, Any]) -> str:
    """The ceiling of a 2-vs-1 ratio on this machine, from the same run's bare split."""
    device, split = statistics.median(probe["device_ms"]), statistics.median(probe["split_ms"])
    rounds = ", ".join(f"{r:.2f}" for r in probe["ratios"])
    return (f"the same products split bare in this run (no runtime: two processes, a barrier "
            f"per layer half, the head on the first; a round before each paired round) gave "
            f"{probe['ratio']:.2f}x ({device:.1f} -> {split:.1f} ms/token; rounds {rounds}): "
            f"what splitting gains on this machine's bus")


def why(point: dict[str, Any], bw: dict[str, Any]) -> str:
    """Where rank 0's token went (its parts add up to ms/token), and the kernel's own rate."""
    m, weights = point["node_breakdown"][0], point["weights"]
    one, two, every = bw["read_gbps_1"], bw["read_gbps_2_per_stream"], bw["read_gbps_cores_total"]
    k1, k2 = bw["kernel_gbps_1"][weights], bw["kernel_gbps_2_per_stream"][weights]
    kall = bw["kernel_gbps_all_cores"][weights]
    return (f"rank 0: own floor {m['floor_ms']:.1f} + compute above it {m['above_floor_ms']:.1f}"
            f" + allreduce wait {m['allreduce_ms']:.1f} + read wait {m['read_wait_ms']:.1f} + "
            f"outside {m['other_ms']:.1f} ms/token; the {weights} matrix-vector kernel alone "
            f"streams {k1:.1f} GB/s ({k2:.1f} each with two at once, {kall:.1f} on every core) "
            f"where the streaming reader gets {one:.1f} ({two:.1f}, {every:.1f})")


def reference(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for system, nodes, weights, ms, ours in REFERENCE:
        point = next((p for w in ours if (p := find(points, nodes, w))), None)
        rows.append({"system": system, "nodes": nodes, "weights": weights, "ms_per_token": ms,
                     "edgetp_weights": point["weights"] if point else None,
                     "edgetp_ms_per_token": point["ms_per_token"] if point else None})
    return rows


# -- the report ---------------------------------------------------------------------------------


def describe(data: dict[str, Any]) -> list[str]:
    c, bw, w = data["model"]["config"], data["bandwidth"], data["workload"]
    load = data["load_average"]
    out, inner = bw["kernel_shape"]
    one, two = bw["kernel_gbps_1"], bw["kernel_gbps_2_per_stream"]
    every = bw["kernel_gbps_all_cores"]
    kernels = ", ".join(f"{d} {one[d]:.1f} / {two[d]:.1f} / {every[d]:.1f} "
                        f"({one[d] / bw['read_gbps_1']:.2f} / "
                        f"{two[d] / bw['read_gbps_2_per_stream']:.2f} / "
                        f"{every[d] / bw['read_gbps_cores_total']:.2f} of the reader's)"
                        for d in one)
    cpu = data["cpu"]
    return [
        f"model: {'tiny ' if data['model']['tiny'] else 'TinyLlama-1.1B-shaped '}Llama, random "
        f"weights: hidden {c['hidden_size']}, MLP {c['intermediate_size']}, "
        f"{c['num_hidden_layers']} layers, {c['num_attention_heads']}/"
        f"{c['num_key_value_heads']} heads, vocab {c['vocab_size']}; float32 checkpoint "
        f"{data['model']['checkpoint_bytes'] / GB:.2f} GB",
        f"workload: {w['prompt_tokens']}-token prompt, {w['new_tokens']} new tokens (no early "
        f"stop), 1 warm-up + {w['runs']} run(s), median of run means; threads: "
        f"{w['threads_per_node']}; nodes = processes on loopback; {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}"
        f"; 1-min load average {load[0]:.1f} before the measurements, {load[1]:.1f} after; "
        f"other processes used {100 * data['others_cpu_share']:.0f}% of the CPUs meanwhile"
        + (" (timings disturbed)" if data["others_cpu_share"] > 0.05 else ""),
        f"cpu: {cpu['model']}, {cpu['cores']} usable cores; flags {' '.join(cpu['flags'])}; "
        f"kernel paths {' '.join(f'{k}:{v}' for k, v in cpu['kernel_paths'].items())}",
        f"memory bandwidth ({bw['reader']} reader, one thread per stream, "
        f"{bw['buffer_bytes'] // MiB} MiB each): 1 stream {bw['read_gbps_1']:.1f} GB/s; 2 "
        f"concurrent {bw['read_gbps_2_total']:.1f} GB/s = {bw['read_gbps_2_per_stream']:.1f} per "
        f"stream; {bw['cores']} concurrent (one per core) {bw['read_gbps_cores_total']:.1f} GB/s "
        f"(issue 12's machine, torch sum: {REFERENCE_BANDWIDTH})",
        f"matrix-vector kernels alone, [1, {inner}] x [{out}, {inner}]^T as edgetp computes "
        f"them, weight GB/s (1 stream / per stream of 2 / every core in one process): "
        f"{kernels}",
    ]


def results_table(points: list[dict[str, Any]]) -> list[str]:
    lines = ["", "floor = slowest node's bytes per token / read bandwidth; kernel floor = the "
             "same bytes / the rate of the dtype's matrix-vector kernel alone (what the "
             "kernel allows)", OUTSIDE_METHOD, "",
             "| nodes | threads | weights | ms/token | read GB/s | floor ms | ratio | "
             "kernel floor ms | ratio | MB/token (slowest node) | rank 0 compute | above floor "
             "| allreduce wait | outside |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        master, slowest = p["node_breakdown"][0], max(p["read_bytes_per_token"])
        lines.append(
            f"| {p['nodes']} | {'+'.join(map(str, p['node_threads']))} | {p['weights']} | "
            f"{p['ms_per_token']:.1f} | "
            f"{p['bandwidth_gbps']:.1f} | {p['floor_ms']:.1f} | "
            f"{p['ratio']:.2f} | {p['kernel_floor_ms']:.1f} | {p['kernel_ratio']:.2f} | "
            f"{slowest / 1e6:.0f} | {master['compute_ms']:.1f} | "
            f"{master['above_floor_ms']:.1f} | {master['allreduce_ms']:.1f} | "
            f"{p['outside_ms']:.1f} |")
    lines += ["", "per node (ms/token): compute = layers + head minus waits; own floor = own "
              "bytes / bandwidth; peak RSS of rank 0 = this process's high-water mark over "
              "every point so far", ""]
    for p in points:
        for n in p["node_breakdown"]:
            lines.append(
                f"  {p['nodes']} node(s) {p['weights']:>8} threads "
                f"{'+'.join(map(str, p['node_threads']))} rank {n['rank']}: compute "
                f"{n['compute_ms']:6.1f} (own floor {n['floor_ms']:6.1f}, above "
                f"{n['above_floor_ms']:6.1f}), allreduce wait {n['allreduce_ms']:5.1f}, read "
                f"wait {n['read_wait_ms']:4.1f}, other {n['other_ms']:5.1f}; peak RSS "
                f"{n['peak_rss_bytes'] / MiB:.0f} MiB")
    return lines


def reference_table(rows: list[dict[str, Any]], tiny: bool) -> list[str]:
    note = " (--tiny: they are for the full-size model)" if tiny else ""
    lines = ["", f"reference figures (issue 12, a machine of this kind) beside edgetp here{note}:",
             "",
             "| system | nodes | weights | ms/token | edgetp ms/token (weights) | edgetp / ref |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ours = (f"{r['edgetp_ms_per_token']:.1f} ({r['edgetp_weights']})"
                if r["edgetp_ms_per_token"] is not None else "not run")
        ratio = (f"{r['edgetp_ms_per_token'] / r['ms_per_token']:.2f}"
                 if r["edgetp_ms_per_token"] is not None else "-")
        lines.append(f"| {r['system']} | {r['nodes']} | {r['weights']} | {r['ms_per_token']:.0f}"
                     f" | {ours} | {ratio} |")
    return lines


def targets_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "targets:", ""]
    for t in rows:
        value = ("" if t["value"] is None else
                 f" (measured {t['value']:.1f} ms)" if t["kind"] == "ms"
                 else f" (measured {t['value']:.2f}x)")
        lines.append(f"  {t['name']}: {t['status']}{value}")
        if t.get("bus"):
            lines.append(f"      reading: {t['bus']}")
        if t.get("why"):
            lines.append(f"      why: {t['why']}")
    return lines


def scaling(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each dtype's 2-node ms/token against one node with a node's threads (one device alone:
    what the second device gains) and against one node on every core of this machine (the
    same cores and memory as the two nodes together: on one machine that is no gain to have)."""
    rows = []
    for two in (p for p in points if p["nodes"] == 2 and p["threads"] is None):
        device = find(points, 1, two["weights"], device_threads(two["node_threads"]))
        machine = find(points, 1, two["weights"])
        rows.append({"weights": two["weights"], "ms_per_token": two["ms_per_token"],
                     "device_ms_per_token": device and device["ms_per_token"],
                     "device_threads": device and device["node_threads"][0],
                     "machine_ms_per_token": machine and machine["ms_per_token"]})
    return rows


def prefill_table(points: list[dict[str, Any]]) -> list[str]:
    rows = [p for p in points if p.get("ttft_ms")]
    if not rows:
        return []
    lines = ["", f"time to first token of a {rows[0]['prefill_tokens']}-token prompt (one "
             f"warm-up, the median of {PREFILL_RUNS} runs)", "",
             "| nodes | threads | weights | TTFT ms | runs |", "|---|---|---|---|---|"]
    for p in rows:
        lines.append(f"| {p['nodes']} | {'+'.join(map(str, p['node_threads']))} | "
                     f"{p['weights']} | {p['ttft_ms']:.0f} | "
                     f"{', '.join(f'{r:.0f}' for r in p['run_ttft_ms'])} |")
    return lines


def scaling_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["", "2 nodes against 1: one device alone (the threads each of the 2 nodes has) and "
             "this whole machine (the cores and memory bus the 2 nodes share here)", "",
             "| weights | 2 nodes ms/token | 1 device ms/token | 2 vs 1 device | 1 node, every "
             "core, ms/token | 2 vs whole machine |", "|---|---|---|---|---|---|"]
    for r in rows:
        device, machine, ms = r["device_ms_per_token"], r["machine_ms_per_token"], r["ms_per_token"]
        lines.append(f"| {r['weights']} | {ms:.1f} | "
                     + (f"{device:.1f} ({r['device_threads']} thr) | {ms / device:.2f}x | "
                        if device else "not run | - | ")
                     + (f"{machine:.1f} | {ms / machine:.2f}x |" if machine else "not run | - |"))
    return lines


def human_report(data: dict[str, Any]) -> str:
    return "\n".join(describe(data) + results_table(data["results"])
                     + scaling_table(data["scaling"]) + paired_table(data["results"])
                     + prefill_table(data["results"])
                     + secure_table(data["results"]) + dllama_table(data["dllama"])
                     + reference_table(data["reference"], data["model"]["tiny"])
                     + targets_table(data["targets"]))


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", default="1,2", help="node counts (default 1,2)")
    parser.add_argument("--dtypes", default=",".join(DTYPES),
                        help=f"weight dtypes (default {','.join(DTYPES)})")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per point (default 3)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per run (default 32)")
    parser.add_argument("--keep", type=Path, help="work directory to keep and reuse")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--tiny", action="store_true", help="a small model of the same family")
    parser.add_argument("--secure", action="store_true",
                        help="run each multi-node point again with CURVE keys and compare")
    parser.add_argument("--prefill-tokens", type=int, default=256,
                        help="prompt tokens of the time-to-first-token runs (default 256; 0: "
                             "none)")
    parser.add_argument("--one-thread", default="float32",
                        help="dtypes also run on one node of one thread (default float32; "
                             "'' for none)")
    parser.add_argument("--paired", action="store_true",
                        help="run each dtype's one device and 2 nodes again, both loaded and "
                             "their runs alternating, the memory bus measured each round")
    parser.add_argument("--dllama", type=Path, metavar="DIR",
                        help="a distributed-llama checkout with dllama built: run it beside "
                             "each float32 and int4 point")
    args = parser.parse_args(argv)
    if args.dllama is not None and (missing := check_checkout(args.dllama)):
        parser.error(f"--dllama: {missing}")
    args.node_counts = [int(n) for n in args.nodes.split(",") if n.strip()]
    args.weight_dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.one_thread_dtypes = [d.strip() for d in args.one_thread.split(",") if d.strip()]
    unknown = sorted(set(args.weight_dtypes + args.one_thread_dtypes) - set(DTYPES))
    if (unknown or args.runs < 1 or args.new_tokens < 2 or not args.node_counts
            or args.prefill_tokens < 0):
        parser.error(f"check --dtypes (unknown: {unknown}; choose from {', '.join(DTYPES)}), "
                     "--runs >= 1, --new-tokens >= 2, --prefill-tokens >= 0 and --nodes")
    return args


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    config = model_config(args.tiny)
    model_dir = ensure_model(root, config)
    load_before, cpu_before, started = os.getloadavg()[0], cpu_seconds(), time.perf_counter()
    bw = bandwidth(config, args.weight_dtypes, args.tiny)  # before any node loads
    peer = (None if args.dllama is None else
            DistributedLlama(args.dllama, root / "dllama", progress=progress))
    points: list[dict[str, Any]] = []
    peers: list[dict[str, Any]] = []

    def run(nodes: int, weights: str, out: Path, threads: int | None = None) -> None:
        points.append(run_point(model_dir, nodes, weights, args, bw, out, threads))
        if peer is not None and weights in WEIGHT_TYPES:
            peers.append(run_peer(peer, model_dir, points[-1], args))

    for nodes in args.node_counts:
        for weights in args.weight_dtypes:
            run(nodes, weights, root / "reports" / f"nodes{nodes}-{weights}")
            if nodes == 1:
                for threads in one_node_threads(weights, args):
                    run(1, weights, root / "reports" / f"nodes1-{weights}-{threads}thread",
                        threads)
    return {"model": {"config": config, "checkpoint_bytes": model_bytes(config),
                      "dir": str(model_dir), "tiny": args.tiny},
            "workload": {"prompt_tokens": PROMPT_TOKENS, "new_tokens": args.new_tokens,
                         "runs": args.runs, "warmup": 1,
                         "threads_per_node": "the defaults: the cores divided among the nodes"},
            "cpu": cpu_facts(),
            "bandwidth": bw, "load_average": [load_before, os.getloadavg()[0]],
            "others_cpu_share": others_share(cpu_before, time.perf_counter() - started),
            "outside_method": OUTSIDE_METHOD, "results": points,
            "reference": reference(points), "scaling": scaling(points), "dllama": peers,
            "targets": targets(points, bw, args.tiny)}


def one_node_threads(weights: str, args: argparse.Namespace) -> list[int]:
    """The thread counts one node of ``weights`` also runs with besides the default: one (for
    ``--one-thread``), and a 2-node cluster's per-node threads (one device alone)."""
    counts = {1} if weights in args.one_thread_dtypes else set()
    device = device_threads(node_threads(2, None)) if 2 in args.node_counts else None
    if device is not None:
        counts.add(device)
    return sorted(counts)


@contextlib.contextmanager
def work_directory(keep: Path | None, prefix: str) -> Iterator[Path]:
    """The run's work directory: ``keep`` (kept and reused) or a temporary one, removed at the
    end. Meanwhile the splits live in it, and the nodes started take their own threads (the
    defaults) and import this repository's edgetp."""
    os.environ.pop("OMP_NUM_THREADS", None)  # each node's threads are its own (the defaults)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    root = keep or Path(tempfile.mkdtemp(prefix=prefix))
    root.mkdir(parents=True, exist_ok=True)
    os.environ["EDGETP_CACHE"] = str(root / "cache")  # splits live in the work directory
    try:
        yield root
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def print_report(text: str, data: dict[str, Any], as_json: bool) -> None:
    """The human report on stdout, or with ``as_json`` on stderr and the JSON on stdout."""
    if as_json:
        print(text, file=sys.stderr)
        print(json.dumps(data))
    else:
        print(text)
    progress("done")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with work_directory(args.keep, "edgetp-decode-") as root:
        data = measure(args, root)
    if args.keep is None:
        for point in data["results"]:
            point["report_dir"] = None  # removed with the temporary work directory
    print_report(human_report(data), data, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
