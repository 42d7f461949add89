"""Device profiles: what one device can do, measured (``edgetp probe``) or written by hand.

A profile holds the figures the planner's cost model needs:

- ``matvec_gbs``: weight bytes per second of matrix-vector products ``[1, d] x [d, k]``, per
  compute dtype. Batch-1 decoding is memory-bound, so this (not FLOP/s) sets the decode speed.
  Measured cycling through more weight copies than any cache holds.
- ``flops_gflops``: a prefill-like ``[128, d] x [d, k]`` matmul, per dtype (prefill speed).
- ``mem_bw_gbs``: a streaming sum over a large tensor (KV cache reads).
- ``disk_bw_mbs``: reads from the shard directory's disk with the page cache dropped
  (``posix_fadvise(DONTNEED)``). A file written for the test is read sequentially and deleted
  (``disk_seq_mbs``); when ``--shard-dir`` holds a split, its tensors are then read the way the
  window streams them (one read per tensor, each range dropped after), and that figure is the
  profile's, since on some disks it is several times lower.
- ``layer_overhead_us`` / ``step_overhead_us``: Python and dispatch time of one decoder layer
  and of one step (embedding, head, sampling) at a size where bytes do not matter.
- ``data_msg_overhead_us``: the same for an allreduce message over the data link
  (``edgetp.net.datalink``: a plain TCP socket, fixed header) to an echo in another process, which
  the star allreduce uses
  unless CURVE is on; left out of a hand-written profile, 55% of ``msg_overhead_us``.
- ``msg_overhead_us``: one message's software cost (edgetp's wire encoding and decoding at
  both ends plus ZeroMQ), half the round trip of a ``[1, 1024]`` float32 message over loopback
  TCP to an echo that decodes it and encodes the reply, as a worker would.
- ``runtime_rss``: the resident memory of a Python process that has imported torch and edgetp,
  before any weight is loaded; ``free_memory``: what the OS reports as available.

Link figures (``link``: round trip, one-way latency, bandwidth) need a peer: run
``edgetp probe --serve-echo PORT`` on the master's machine and ``edgetp probe --master
tcp://MASTER:PORT`` on each device. Without ``--master`` the link is not measured.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgetp.core.errors import ClusterError, ConfigError
from edgetp.core.files import read_json
from edgetp.core.units import parse_bytes

PROFILE_VERSION = 1
COMPUTE_DTYPES = ("float32", "bfloat16")
QUANT_FORMATS = ("int8", "int4")
MATVEC_DTYPES = (*COMPUTE_DTYPES, *QUANT_FORMATS)  # weights a product reads
# A hand-written profile without int8/int4 figures gets these fractions of its float32 one
# (torch 2.13's CPU kernels on the development machine; `edgetp probe` measures them).
QUANT_MATVEC_FRACTION = {"int8": 0.55, "int4": 0.6}

# Figures used when a hand-written profile leaves them out (a mid-range laptop; see README).
DEFAULTS: dict[str, Any] = {
    "flops_gflops": 50.0,
    "disk_bw_mbs": 500.0,
    "layer_overhead_us": 150.0,
    "step_overhead_us": 300.0,
    "msg_overhead_us": 60.0,
    "runtime_rss": 300 * 2**20,
}
PERF_KEYS = ("mem_bw_gbs", "matvec_gbs", "flops_gflops", "disk_bw_mbs", "layer_overhead_us",
             "step_overhead_us", "msg_overhead_us", "data_msg_overhead_us", "runtime_rss",
             "free_memory")
DATA_LINK_FRACTION = 0.55  # a data-link message's cost over a ZeroMQ one, when not measured
INFO_KEYS = ("version", "host", "cpu_count", "threads", "torch_version", "disk_path",
             "disk_seq_mbs", "disk_note", "total_memory", "link", "quick", "probe_seconds",
             "matvec_shapes")


@dataclass(frozen=True)
class DeviceProfile:
    """What one device does per second; see the module docstring for each figure."""

    mem_bw_gbs: float
    matvec_gbs: dict[str, float]
    flops_gflops: dict[str, float]
    disk_bw_mbs: float
    layer_overhead_us: float
    step_overhead_us: float
    msg_overhead_us: float
    runtime_rss: int
    free_memory: int | None = None
    data_msg_overhead_us: float = 0.0  # 0: DATA_LINK_FRACTION of msg_overhead_us

    def matvec_bytes_per_s(self, dtype: str) -> float:
        return self.matvec_gbs[dtype] * 1e9

    def flops_per_s(self, dtype: str) -> float:
        return self.flops_gflops[dtype] * 1e9

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "profile") -> DeviceProfile:
        """Validate a profile mapping (from ``edgetp probe`` or written by hand)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a profile must be a mapping of figures")
        unknown = sorted(set(data) - set(PERF_KEYS) - set(INFO_KEYS))
        if unknown:
            raise ConfigError(f"{source}: unknown profile key(s) {unknown}; known: "
                              f"{', '.join(PERF_KEYS)}")
        if "mem_bw_gbs" not in data:
            raise ConfigError(f"{source}: the profile needs mem_bw_gbs (memory bandwidth, GB/s)")
        values = {**DEFAULTS, **data}
        mem_bw = _positive(values["mem_bw_gbs"], "mem_bw_gbs", source)
        free = values.get("free_memory")
        return cls(
            mem_bw_gbs=mem_bw,
            matvec_gbs=_matvec_figures(values.get("matvec_gbs", mem_bw), source),
            flops_gflops=_per_dtype(values["flops_gflops"], "flops_gflops", source),
            disk_bw_mbs=_positive(values["disk_bw_mbs"], "disk_bw_mbs", source),
            layer_overhead_us=_positive(values["layer_overhead_us"], "layer_overhead_us", source,
                                        zero_ok=True),
            step_overhead_us=_positive(values["step_overhead_us"], "step_overhead_us", source,
                                       zero_ok=True),
            msg_overhead_us=_positive(values["msg_overhead_us"], "msg_overhead_us", source,
                                      zero_ok=True),
            data_msg_overhead_us=_positive(
                values.get("data_msg_overhead_us",
                           DATA_LINK_FRACTION * _positive(values["msg_overhead_us"],
                                                          "msg_overhead_us", source, True)),
                "data_msg_overhead_us", source, zero_ok=True),
            runtime_rss=_size(values["runtime_rss"], "runtime_rss", source),
            free_memory=None if free is None else _size(free, "free_memory", source),
        )


def _positive(value: Any, name: str, source: str, zero_ok: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero_ok):
        raise ConfigError(f"{source}: {name} must be a positive number, got {value!r}")
    return number


def _per_dtype(value: Any, name: str, source: str) -> dict[str, float]:
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(COMPUTE_DTYPES))
        missing = [d for d in COMPUTE_DTYPES if d not in value]
        if unknown or missing:
            raise ConfigError(f"{source}: {name} needs exactly the keys "
                              f"{', '.join(COMPUTE_DTYPES)} (or one number for both)")
        return {d: _positive(value[d], f"{name}.{d}", source) for d in COMPUTE_DTYPES}
    number = _positive(value, name, source)
    return dict.fromkeys(COMPUTE_DTYPES, number)


def _matvec_figures(value: Any, source: str) -> dict[str, float]:
    """float32 and bfloat16 (one number for both), int8 and int4 optional (else fractions of
    the float32 figure, :data:`QUANT_MATVEC_FRACTION`)."""
    quant = {}
    if isinstance(value, dict):
        value = dict(value)
        quant = {f: _positive(value.pop(f), f"matvec_gbs.{f}", source)
                 for f in QUANT_FORMATS if f in value}
    figures = _per_dtype(value, "matvec_gbs", source)
    for fmt in QUANT_FORMATS:
        figures[fmt] = quant.get(fmt, figures["float32"] * QUANT_MATVEC_FRACTION[fmt])
    return figures


def _size(value: Any, name: str, source: str) -> int:
    try:
        return parse_bytes(value if isinstance(value, str) else int(value))
    except (ConfigError, TypeError, ValueError):
        raise ConfigError(f"{source}: {name} must be a size such as 300MB or 8GiB, "
                          f"got {value!r}") from None


def load_profile(path: str | Path) -> DeviceProfile:
    """Read a profile JSON file written by ``edgetp probe`` (or by hand)."""
    data = read_json(path, "profile", fix=f"create it with `edgetp probe --out {path}`")
    return DeviceProfile.from_dict(data, str(path))


# -- measuring ------------------------------------------------------------------------------

Log = Callable[[str], None]


def probe_device(shard_dir: str | Path | None = None, master: str | None = None,
                 quick: bool = False, threads: int | None = None,
                 log: Log | None = None) -> dict[str, Any]:
    """Measure this device; returns the profile as a JSON-ready dict (perf and info keys)."""
    import psutil
    import torch

    import edgetp.runtime.worker  # noqa: F401 - a worker's imports, for the baseline RSS

    log = log or (lambda _message: None)
    started = time.perf_counter()
    runtime_rss = _runtime_rss()
    if threads:
        torch.set_num_threads(threads)
    shapes = _matvec_shapes(shard_dir)
    scale = 0.25 if quick else 1.0
    out: dict[str, Any] = {"version": PROFILE_VERSION, "host": platform.node(),
                           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                           "torch_version": torch.__version__, "quick": quick,
                           "matvec_shapes": [list(s) for s in shapes], "runtime_rss": runtime_rss}
    out["mem_bw_gbs"] = _round(measure_memory_bandwidth(int(256e6 * scale)))
    log(f"memory bandwidth {out['mem_bw_gbs']} GB/s")
    out["matvec_gbs"] = {d: _round(measure_matvec(d, shapes, int(160e6 * scale), 0.8 * scale))
                         for d in MATVEC_DTYPES}
    log(f"matrix-vector {out['matvec_gbs']} GB/s")
    out["flops_gflops"] = {d: _round(measure_matmul(d, shapes, 0.3 * scale))
                           for d in COMPUTE_DTYPES}
    log(f"matmul [128, d] {out['flops_gflops']} GFLOP/s")
    layer_us, step_us = measure_overheads(40 if quick else 200)
    out["layer_overhead_us"], out["step_overhead_us"] = _round(layer_us), _round(step_us)
    log(f"overhead per layer {layer_us:.0f} us, per step {step_us:.0f} us")
    disk_dir, rank_dir = _disk_dir(shard_dir), _rank_dir(shard_dir)
    window_mbs = None  # before the test file is written: its write-back would slow reads
    if rank_dir is not None and hasattr(os, "posix_fadvise"):
        window_mbs = measure_window_reads(rank_dir, int(32e6 if quick else 128e6))
    try:
        disk_mbs, note = measure_disk(disk_dir, int(32e6 if quick else 128e6))
    except OSError as exc:
        raise ConfigError(f"the disk test in {disk_dir} failed ({exc}); give --shard-dir a "
                          "writable directory with 128 MB free") from exc
    out.update(disk_seq_mbs=_round(disk_mbs), disk_path=str(disk_dir), disk_note=note)
    if window_mbs is not None:
        disk_mbs = window_mbs
        out["disk_note"] = (f"read as the window reads {rank_dir.name}'s tensors; a test file "
                            f"read sequentially at {out['disk_seq_mbs']} MB/s")
    out["disk_bw_mbs"] = _round(disk_mbs)
    log(f"disk read {disk_mbs:.0f} MB/s in {disk_dir}"
        + (f" ({out['disk_note']})" if out["disk_note"] else ""))
    out["msg_overhead_us"] = _round(measure_loopback(50 if quick else 300))
    out["data_msg_overhead_us"] = _round(measure_data_link(50 if quick else 300))
    log(f"message overhead {out['msg_overhead_us']} us over ZeroMQ, "
        f"{out['data_msg_overhead_us']} us over the data link (loopback)")
    memory = psutil.virtual_memory()
    out["free_memory"], out["total_memory"] = int(memory.available), int(memory.total)
    if master:
        out["link"] = measure_link(master, 10 if quick else 50)
        log(f"link to {master}: {out['link']}")
    out["probe_seconds"] = _round(time.perf_counter() - started)
    return out


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def _runtime_rss() -> int:
    """RSS once a worker's imports are done and its loader has built a model skeleton on
    ``meta`` (torch's first meta initialisation costs tens of MB, once)."""
    import torch

    from edgetp.model.llama import Transformer

    with torch.device("meta"):
        Transformer(_TINY_CONFIG(), max_seq_len=16)
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


def _rank_dir(shard_dir: str | Path | None) -> Path | None:
    """The rank directory of a split given as itself or as its parent (a worker's if any)."""
    if shard_dir is None:
        return None
    directory = Path(shard_dir)
    ranks = sorted(directory.glob("rank-*/manifest.json"))
    if ranks:
        directory = ranks[min(1, len(ranks) - 1)].parent
    return directory if (directory / "manifest.json").is_file() else None


def _matvec_shapes(shard_dir: str | Path | None) -> list[tuple[int, int]]:
    """(in, out) of the linears of a shard's first layer, else a generic mix of sizes."""
    directory = _rank_dir(shard_dir)
    if directory is not None:
        from edgetp.shard.manifest import read_manifest

        manifest = read_manifest(directory)
        layer = min(n for n in manifest.files if n.startswith("layer-"))
        per_byte = 2 if manifest.dtype == "int4" else 1  # int4: two codes per stored byte
        return [(e.shape[1] * per_byte, e.shape[0])
                for name, e in manifest.files[layer].tensors.items()
                if name.endswith("proj.weight")]
    return [(4096, 4096), (4096, 1024), (4096, 11008), (11008, 4096), (2048, 8192)]


def measure_matvec(dtype: str, shapes: list[tuple[int, int]], total_bytes: int,
                   seconds: float, rounds: int = 8) -> float:
    """Weight bytes per second of ``x [1, in] @ W.T`` over copies too many for any cache
    (the best of ``rounds`` rounds, so a burst of other load on the machine is left out).
    Each product runs the code a decode step runs (``edgetp.kernels.native``; int8/int4 as
    edgetp.parallel.qlinear), with the scales counted as weight bytes, as a split stores them."""
    import torch

    per_round = sum(_matvec_product(dtype, shape, sizes_only=True)[1] for shape in shapes)
    copies = max(1, math.ceil(total_bytes / per_round))
    products = [_matvec_product(dtype, shape) for _ in range(copies) for shape in shapes]
    for product, _ in products:  # warm up (and fault every page in)
        product()
    best = 0.0
    with torch.inference_mode():
        for _ in range(rounds):
            nbytes, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds / rounds or nbytes == 0:
                for product, _ in products:
                    product()
                nbytes += per_round * copies
            best = max(best, nbytes / elapsed / 1e9)
    return best


def _matvec_product(dtype: str, shape: tuple[int, int], sizes_only: bool = False
                    ) -> tuple[Callable[[], Any], int]:
    """A ``[1, in] @ W.T`` product for weights of ``shape`` (in, out) in ``dtype``, and its
    weight bytes; ``sizes_only``: no tensors (just the bytes)."""
    import torch

    from edgetp.kernels import native as kernels
    from edgetp.parallel.qlinear import int4_product, int8_product
    from edgetp.shard.quant import (
        int4_group,
        int4_tiled,
        native_int4_pack,
        native_int4_tiled,
        pack_int4,
    )

    n_in, n_out = shape
    if dtype == "int8":
        nbytes = n_out * n_in + 2 * n_out  # I8 codes, a BF16 scale per row
    elif dtype == "int4":
        group = int4_group([n_in], 32)
        nbytes = n_out * n_in // 2 + 4 * (n_in // group) * n_out  # U8 codes, BF16 pairs
    else:
        nbytes = n_out * n_in * getattr(torch, dtype).itemsize
    if sizes_only:
        return (lambda: None), nbytes
    x = torch.full((1, n_in), 0.5)  # [1, in] float32, as a quantized run's activations
    step = torch.empty(1, n_out)  # [1, out]: the buffer a decode linear writes into
    if dtype == "int8":
        q = torch.ones((n_out, n_in), dtype=torch.int8)
        scale = torch.full((n_out,), 0.01, dtype=torch.bfloat16)
        return (lambda: int8_product(x, q, scale, out=step)), nbytes
    if dtype == "int4":
        tiled = int4_tiled(n_out, group)  # else the runtime's fallback, as for such a split
        packed = pack_int4(torch.full((n_out, n_in), 9, dtype=torch.uint8), tiled)
        native = tiled and native_int4_tiled()
        repacked = tiled and not native and not kernels.has_int4()
        if repacked:  # resident weights are repacked once for this CPU
            packed = native_int4_pack(packed)
        scale_zero = torch.full((n_in // group, n_out, 2), 0.01, dtype=torch.bfloat16)
        return (lambda: int4_product(x, packed, scale_zero, group, tiled, repacked,
                                     out=step)), nbytes
    w = torch.full((n_out, n_in), 0.01, dtype=getattr(torch, dtype))
    xd, step = x.to(w.dtype), step.to(w.dtype)
    return (lambda: kernels.linear(xd, w, step)), nbytes  # the C decode kernels, or torch


def measure_matmul(dtype: str, shapes: list[tuple[int, int]], seconds: float,
                   tokens: int = 128) -> float:
    """GFLOP/s a prefill-like ``[tokens, in] @ W.T`` adds over the ``[1, in]`` product with
    the same weights: the planner costs a T-token product as ``bytes / matvec bandwidth +
    2 (T - 1) params / this rate``, which fits CPU timings from T = 1 to 128."""
    import torch
    import torch.nn.functional as F

    torch_dtype = getattr(torch, dtype)
    weights = [torch.full((min(o, 4096), min(i, 4096)), 0.01, dtype=torch_dtype)
               for i, o in shapes[:2]]

    def best_time(rows: int) -> float:
        inputs = [torch.full((rows, w.shape[1]), 0.5, dtype=torch_dtype) for w in weights]
        for x, w in zip(inputs, weights, strict=True):
            F.linear(x, w)
        best, deadline = math.inf, time.perf_counter() + seconds / 2
        while time.perf_counter() < deadline or best == math.inf:
            started = time.perf_counter()
            for x, w in zip(inputs, weights, strict=True):
                F.linear(x, w)
            best = min(best, time.perf_counter() - started)
        return best

    extra = best_time(tokens) - best_time(1)
    flops = 2 * (tokens - 1) * sum(w.numel() for w in weights)
    return flops / max(extra, 1e-9) / 1e9


def measure_memory_bandwidth(nbytes: int) -> float:
    """GB/s of a streaming sum over ``nbytes`` of float32 (best of five)."""
    import torch

    data = torch.full((max(nbytes // 4, 1024),), 1.0)
    best = math.inf
    for _ in range(5):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best / 1e9


def _TINY_CONFIG() -> Any:  # noqa: N802 - a constant, built lazily
    from edgetp.config.model import parse_hf_config

    return parse_hf_config({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256})


def measure_overheads(iterations: int) -> tuple[float, float]:
    """(per-layer, per-step) microseconds of a tiny model where bytes do not matter."""
    import torch

    from edgetp.core.metrics import instrument
    from edgetp.model.llama import Transformer

    model = Transformer(_TINY_CONFIG()).eval()
    instrument(model)  # the loader's per-layer timing hooks are part of the overhead
    model.allocate_cache()
    token = torch.tensor([3])

    def step_s(layers: range, position: int) -> float:
        started = time.perf_counter()
        model.head(model.forward_layers(model.embed(token), position, layers))
        return time.perf_counter() - started

    ones, fours = [], []
    with torch.inference_mode():
        for i in range(iterations + 20):  # interleaved, so drifts hit both alike
            one, four = step_s(range(1), 16 + i % 64), step_s(range(4), 16 + i % 64)
            if i >= 20:
                ones.append(one)
                fours.append(four)
    one, four = _quartile(ones) * 1e6, _quartile(fours) * 1e6  # robust to other load
    layer = max(0.0, (four - one) / 3)
    return layer, max(0.0, one - layer)


def _quartile(values: list[float]) -> float:
    return sorted(values)[len(values) // 4]


def _disk_dir(shard_dir: str | Path | None) -> Path:
    if shard_dir is not None and Path(shard_dir).is_dir():
        return Path(shard_dir)
    return Path(tempfile.gettempdir())


def measure_disk(directory: Path, nbytes: int, block: int = 4 << 20) -> tuple[float, str]:
    """MB/s of a sequential read of a file written here, its page cache dropped first."""
    note = ""
    path = directory / f".edgetp-probe-{os.getpid()}.bin"
    chunk = os.urandom(1 << 20) * (block >> 20)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write a test file in {directory} ({exc.strerror}); give "
                          "--shard-dir a writable directory on the disk the shards use") from exc
    try:
        for _ in range(max(1, nbytes // block)):
            os.write(fd, chunk)
        os.fsync(fd)
        size = os.fstat(fd).st_size
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        else:
            note = "no posix_fadvise: the read may come from the page cache"
        buffer = bytearray(block)
        view = memoryview(buffer)
        started, offset = time.perf_counter(), 0
        while offset < size:
            n = os.preadv(fd, [view], offset)
            if n <= 0:
                break
            offset += n
        elapsed = time.perf_counter() - started
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    mbs = size / elapsed / 1e6
    if mbs > 20000:
        note = note or "faster than any disk: the page cache was not dropped (tmpfs?)"
    return mbs, note


def measure_window_reads(rank_dir: Path, nbytes: int) -> float:
    """MB/s reading a split's tensors the way the window streams them: one ``pread`` per
    tensor, each range's page cache dropped right after, and no readahead (streamed blocks
    lie between pinned ones, so what the kernel would read ahead is mostly not wanted). On
    some disks this is half the rate of one long sequential read."""
    from edgetp.shard.manifest import read_manifest

    manifest = read_manifest(rank_dir)
    names = sorted(n for n in manifest.files if n != "embed.safetensors")
    ranges = [(name, e.offsets) for name in names
              for e in manifest.files[name].tensors.values()]
    buffer = memoryview(bytearray(max(b - a for _, (a, b) in ranges)))
    fds = {name: os.open(rank_dir / name, os.O_RDONLY) for name in names}
    try:
        for fd in fds.values():
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        done, started = 0, time.perf_counter()
        while done < nbytes:
            for name, (start, stop) in ranges:
                done += os.preadv(fds[name], [buffer[: stop - start]], start)
                os.posix_fadvise(fds[name], start, stop - start, os.POSIX_FADV_DONTNEED)
        return done / (time.perf_counter() - started) / 1e6
    finally:
        for fd in fds.values():
            os.close(fd)


def _echo_loop(sock: Any, stop: threading.Event | None, max_messages: int | None) -> None:
    """Answer each message as a worker would: decode it, encode the reply (a ``sum``)."""
    import zmq

    from edgetp.net import wire

    served = 0
    while (stop is None or not stop.is_set()) and (max_messages is None or served < max_messages):
        if sock.poll(100, zmq.POLLIN):
            identity, *frames = sock.recv_multipart(copy=False)
            message = wire.decode(frames)
            sock.send_multipart([identity, *wire.encode("sum", message.fields, message.tensors)],
                                copy=False)
            served += 1


def serve_echo(port: int, max_messages: int | None = None, host: str = "0.0.0.0") -> None:
    """Echo every message back (the peer of ``edgetp probe --master``); runs until stopped."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 1000)  # the last echo still leaves after the loop ends
    sock.bind(f"tcp://{host}:{port}")
    try:
        _echo_loop(sock, None, max_messages)
    finally:
        sock.close()


def _round_trips(address: str, rows: int, count: int, timeout_s: float = 3.0) -> list[float]:
    """Seconds per round trip of a ``partial`` message of ``rows`` x 1024 float32."""
    import torch
    import zmq

    from edgetp.net import wire

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    tensor = torch.full((rows, 1024), 0.5)
    times = []
    try:
        for index in range(count + 2):
            started = time.perf_counter()
            sock.send_multipart(wire.encode("partial", {"seq": 1, "step": 1, "index": index},
                                            [tensor]), copy=False)
            if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
                raise ClusterError(f"no echo from {address} within {timeout_s:g} s; run "
                                   "`edgetp probe --serve-echo PORT` on that machine first")
            wire.decode(sock.recv_multipart(copy=False))
            times.append(time.perf_counter() - started)
    finally:
        sock.close(0)
    return times[2:]


def measure_loopback(count: int) -> float:
    """Microseconds of software per message: half a loopback round trip of one row."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    thread = threading.Thread(target=_echo_loop, args=(sock, stop, None), daemon=True)
    thread.start()
    try:
        times = _round_trips(f"tcp://127.0.0.1:{port}", 1, count)
    finally:
        stop.set()
        thread.join(timeout=2)
        sock.close(0)
    return statistics.median(times) / 2 * 1e6


def measure_data_link(count: int) -> float:
    """Microseconds of software per allreduce message over the data link: half a loopback
    round trip of one row to another process that receives it and answers with a sum, as a
    worker does (a thread of this process would share its interpreter lock and wake-ups, and
    read less than half the real cost)."""
    import multiprocessing

    import torch

    from edgetp.net import datalink as dataplane

    listener = dataplane.DataListener()
    child = multiprocessing.get_context("spawn").Process(
        target=_data_echo, args=(listener.port, listener.token, count + 2), daemon=True)
    child.start()
    try:
        link = listener.accept(timeout_s=60.0)  # the child imports torch first
        row, times = torch.full((1, 1024), 0.5), []
        for index in range(count + 2):
            started = time.perf_counter()
            link.send(dataplane.OP_PARTIAL, "f32", (1, 1, index), [row])
            link.receive("f32", (1, 1024), time.monotonic() + 5.0)
            times.append(time.perf_counter() - started)
        link.close()
    finally:
        listener.close()
        child.join(timeout=5)
        if child.is_alive():
            child.terminate()
    return statistics.median(times[2:]) / 2 * 1e6


def _data_echo(port: int, token: str, count: int) -> None:
    """The other process of :func:`measure_data_link`."""
    from edgetp.net import datalink as dataplane

    link = dataplane.connect("127.0.0.1", port, token)
    try:
        for _ in range(count):
            got = link.receive("f32", (1, 1024), time.monotonic() + 10.0)
            link.send(dataplane.OP_SUM, "f32", (got.seq, got.step, got.index), got.tensors)
    finally:
        link.close()


def measure_link(address: str, count: int) -> dict[str, float]:
    """Round trip, one-way latency and bandwidth to an echo peer (``--serve-echo``)."""
    small = statistics.median(_round_trips(address, 1, count))
    large = statistics.median(_round_trips(address, 256, max(3, count // 5)))
    extra_bytes = 2 * (256 - 1) * 1024 * 4  # both directions
    bandwidth = extra_bytes * 8 / max(large - small, 1e-9) / 1e6
    return {"rtt_ms": _round(small * 1e3), "latency_ms": _round(small * 1e3 / 2),
            "bandwidth_mbit": _round(bandwidth)}


def describe_profile(data: dict[str, Any]) -> str:
    """A few human lines about a probe result."""
    lines = [f"host {data.get('host')} ({data.get('cpu_count')} CPUs, {data.get('threads')} "
             f"torch threads), probe took {data.get('probe_seconds')} s",
             f"  matrix-vector: float32 {data['matvec_gbs']['float32']} GB/s, bfloat16 "
             f"{data['matvec_gbs']['bfloat16']} GB/s;  memory {data['mem_bw_gbs']} GB/s",
             f"  matmul [128, d]: float32 {data['flops_gflops']['float32']} GFLOP/s, bfloat16 "
             f"{data['flops_gflops']['bfloat16']} GFLOP/s",
             f"  disk read {data['disk_bw_mbs']} MB/s ({data['disk_path']})"
             + (f" - {data['disk_note']}" if data.get("disk_note") else ""),
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
