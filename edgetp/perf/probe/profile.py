"""A whole probe: every measurement in order, written as the profile ``edgetp probe`` prints,
and a few human lines about it. The profile's keys are :mod:`edgetp.config.device`'s."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgetp.config.device import COMPUTE_DTYPES, MATVEC_DTYPES, PROFILE_VERSION, profile_figure
from edgetp.core.errors import ConfigError
from edgetp.perf.probe.compute import (
    matvec_shapes,
    measure_matmul,
    measure_matvec,
    measure_memory_bandwidth,
    measure_overheads,
    tiny_config,
)
from edgetp.perf.probe.disk import disk_dir, measure_disk, measure_window_reads, split_rank_dir
from edgetp.perf.probe.link import measure_data_link, measure_link, measure_loopback

Log = Callable[[str], None]


def probe_device(shard_dir: str | Path | None = None, master: str | None = None,
                 quick: bool = False, threads: int | None = None,
                 log: Log | None = None) -> dict[str, Any]:
    """Measure this device; returns the profile as a JSON-ready dict (perf and info keys)."""
    import psutil
    import torch

    import edgetp.runtime.worker  # noqa: F401 - a worker's imports, for the baseline RSS
    from edgetp.kernels.threads import use_threads

    log = log or (lambda _message: None)
    started = time.perf_counter()
    runtime_rss = _runtime_rss()
    use_threads(threads)  # the products' and torch's, as a node with this setting runs
    shapes = matvec_shapes(shard_dir)
    out: dict[str, Any] = {"version": PROFILE_VERSION, "host": platform.node(),
                           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                           "torch_version": torch.__version__, "quick": quick,
                           "matvec_shapes": [list(s) for s in shapes], "runtime_rss": runtime_rss}
    out.update(_kernel_info(log))
    out.update(_compute_figures(shapes, quick, log))
    out.update(_disk_figures(shard_dir, quick, log))
    out["msg_overhead_us"] = profile_figure(measure_loopback(50 if quick else 300))
    out["data_msg_overhead_us"] = profile_figure(measure_data_link(50 if quick else 300))
    log(f"message overhead {out['msg_overhead_us']} us over ZeroMQ, "
        f"{out['data_msg_overhead_us']} us over the data link (loopback)")
    memory = psutil.virtual_memory()
    out["free_memory"], out["total_memory"] = int(memory.available), int(memory.total)
    if master:
        out["link"] = measure_link(master, 10 if quick else 50)
        log(f"link to {master}: {out['link']}")
    out["probe_seconds"] = profile_figure(time.perf_counter() - started)
    return out


def _kernel_info(log: Log) -> dict[str, Any]:
    """Which decode kernel path each product takes here (the rates below are those paths')."""
    from edgetp.core import settings
    from edgetp.kernels import native

    paths = native.kernel_paths()
    log("decode kernels (" + settings.kernel_target() + "): "
        + ", ".join(f"{product} {path}" for product, path in paths.items()))
    return {"kernel_paths": paths, "kernel_target": settings.kernel_target()}


def _compute_figures(shapes: list[tuple[int, int]], quick: bool, log: Log) -> dict[str, Any]:
    """Memory bandwidth, matrix-vector and matmul rates, per-layer and per-step overheads."""
    scale = 0.25 if quick else 1.0
    out: dict[str, Any] = {}
    out["mem_bw_gbs"] = profile_figure(measure_memory_bandwidth(int(256e6 * scale)))
    out.update(_stream_figures(quick))
    log(f"memory bandwidth {out['mem_bw_gbs']} GB/s ({out['stream_reader']}; "
        + ", ".join(f"{n} streams at once {gbs} GB/s" for n, gbs in out["stream_read_gbs"].items())
        + ")")
    out["matvec_gbs"] = {d: profile_figure(measure_matvec(d, shapes, int(160e6 * scale),
                                                          0.8 * scale))
                         for d in MATVEC_DTYPES}
    log(f"matrix-vector {out['matvec_gbs']} GB/s")
    out["flops_gflops"] = {d: profile_figure(measure_matmul(d, shapes, 0.3 * scale))
                           for d in COMPUTE_DTYPES}
    log(f"matmul [128, d] {out['flops_gflops']} GFLOP/s")
    layer_us, step_us = measure_overheads(40 if quick else 200)
    out["layer_overhead_us"] = profile_figure(layer_us)
    out["step_overhead_us"] = profile_figure(step_us)
    log(f"overhead per layer {layer_us:.0f} us, per step {step_us:.0f} us")
    return out


def _stream_figures(quick: bool) -> dict[str, Any]:
    """The read rate of one stream and of one stream per core at once (one process each, as a
    local cluster's nodes): the floor of a decode token on one node and on a node per core."""
    from edgetp.kernels.native import usable_cores
    from edgetp.perf.streams import read_rates, reader_name

    counts = sorted({1, usable_cores()})
    rates = read_rates(counts, int(64e6 if quick else 256e6), 0.1 if quick else 0.5,
                       rounds=2 if quick else 3)
    return {"stream_reader": reader_name(),
            "stream_read_gbs": {str(n): profile_figure(rate / 1e9) for n, rate in rates.items()}}


def _disk_figures(shard_dir: str | Path | None, quick: bool, log: Log) -> dict[str, Any]:
    """The disk's sequential read rate, and the window's (the profile's figure) for a split."""
    directory, rank_dir = disk_dir(shard_dir), split_rank_dir(shard_dir)
    nbytes = int(32e6 if quick else 128e6)
    window_mbs = None  # before the test file is written: its write-back would slow reads
    if rank_dir is not None and hasattr(os, "posix_fadvise"):
        window_mbs = measure_window_reads(rank_dir, nbytes)
    try:
        disk_mbs, note = measure_disk(directory, nbytes)
    except OSError as exc:
        raise ConfigError(f"the disk test in {directory} failed ({exc}); give --shard-dir a "
                          "writable directory with 128 MB free") from exc
    out: dict[str, Any] = {"disk_seq_mbs": profile_figure(disk_mbs),
                           "disk_path": str(directory), "disk_note": note}
    if rank_dir is not None and window_mbs is not None:
        disk_mbs = window_mbs
        out["disk_note"] = (f"read as the window reads {rank_dir.name}'s tensors; a test file "
                            f"read sequentially at {out['disk_seq_mbs']} MB/s")
    out["disk_bw_mbs"] = profile_figure(disk_mbs)
    log(f"disk read {disk_mbs:.0f} MB/s in {directory}"
        + (f" ({out['disk_note']})" if out["disk_note"] else ""))
    return out


def _runtime_rss() -> int:
    """RSS once a worker's imports are done and its loader has built a model skeleton on
    ``meta`` (torch's first meta initialisation costs tens of MB, once)."""
    import torch

    from edgetp.model.llama import Transformer

    with torch.device("meta"):
        Transformer(tiny_config(), max_seq_len=16)
    return _rss()


def _rss() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.Process().memory_info().rss)


def describe_profile(data: dict[str, Any]) -> str:
    """A few human lines about a probe result."""
    lines = [f"host {data.get('host')} ({data.get('cpu_count')} CPUs, {data.get('threads')} "
             f"threads), probe took {data.get('probe_seconds')} s",
             f"  matrix-vector: float32 {data['matvec_gbs']['float32']} GB/s, bfloat16 "
             f"{data['matvec_gbs']['bfloat16']} GB/s;  memory {data['mem_bw_gbs']} GB/s",
             f"  matmul [128, d]: float32 {data['flops_gflops']['float32']} GFLOP/s, bfloat16 "
             f"{data['flops_gflops']['bfloat16']} GFLOP/s",
             f"  disk read {data['disk_bw_mbs']} MB/s ({data['disk_path']})"
             + (f" - {data['disk_note']}" if data.get("disk_note") else ""),
             "  decode kernels: " + (", ".join(f"{product} {path}" for product, path
                                              in (data.get("kernel_paths") or {}).items())
                                    or "not recorded (an older profile)"),
             f"  overheads: {data['layer_overhead_us']} us/layer, {data['step_overhead_us']} "
             f"us/step, {data['msg_overhead_us']} us/message "
             f"({data.get('data_msg_overhead_us', '-')} over the data link)",
             f"  memory: {data['free_memory'] / 2**30:.2f} GiB available, runtime "
             f"{data['runtime_rss'] / 2**20:.0f} MiB"]
    link = data.get("link")
    lines.append(f"  link: {link}" if link else
                 "  link: not measured (give --master tcp://HOST:PORT of an "
                 "`edgetp probe --serve-echo PORT`)")
    return "\n".join(lines)
