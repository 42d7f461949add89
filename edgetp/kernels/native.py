"""Native decode kernels: one-token matrix-vector products in C, built on first use.

At batch size 1 a linear is a matrix-vector product that only has to stream its weight at
memory speed. torch's CPU kernels leave bandwidth on the table there (float32 ``F.linear``
~16-17 GB/s on this machine against ~19-22 GB/s for ``csrc/matvec.c``; bfloat16 and int8 lose
more, to widening), so a one-row product goes through the C loops when they are available,
writing into a buffer its caller keeps (no allocation per step). Up to :data:`MAX_BATCH_ROWS`
rows (a continuous batch's decode step) go through the batched C products, which read each
weight row once for all of them and give every row bitwise the one-row product of that row
alone. Everything else (prefill chunks of more rows, non-contiguous weights, CPUs without a C
compiler) stays with torch.

The library is compiled with the machine's C compiler (``$CC``, else ``cc``) for this very CPU
(``-march=native``, or ``-mcpu=native`` where that is the spelling) into
``$EDGETP_KERNEL_CACHE`` (default ``~/.cache/edgetp/kernels``), keyed by the source, the
compiler, the flags, the target and the CPU, and loaded with ctypes (which drops the GIL during
a call). Every product has hand-written loops for AVX-512, AVX2 (+ AVX-VNNI) and AArch64 NEON
(+ sdot, usdot), chosen by the compiler's feature macros, and plain C loops elsewhere.
``EDGETP_KERNEL_TARGET`` builds for an older target instead (``x86-64-v3``: the AVX2 paths on
an AVX-512 machine); :func:`kernel_paths` names the paths the library compiled in.
A failed build logs one warning and leaves torch in charge. ``EDGETP_NATIVE_KERNELS=0`` turns
the kernels off (for comparisons).

Each product splits its output rows over a pool of persistent threads (``csrc/pool.c``): all
the cores this process may use unless :func:`set_threads` says otherwise (a node's ``threads``
setting, ``--threads``, a local cluster's share of the machine). Every row is summed by one
thread with the one-thread kernel's code, so results do not depend on the thread count.
``csrc/stream.c`` is the plain streaming reader whose rate is the floor the products are
measured against (:func:`stream_read`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from edgetp.core import settings
from edgetp.kernels.buffers import step_buffer

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "matvec.c"  # the kernels (one thread each)
POOL_SOURCE = SOURCE.parent / "pool.c"  # their thread pool
STREAM_SOURCE = SOURCE.parent / "stream.c"  # the streaming reader
SPIN_SOURCE = SOURCE.parent / "spinwait.c"  # the allreduce's wait, and the 2-rank exchange
OPS_SOURCE = SOURCE.parent / "decode_ops.c"  # a decode step's norm and attention
STEP_SOURCE = SOURCE.parent / "step.c"  # a layer half's step in one call (kernels.step)
SOURCES = (SOURCE, POOL_SOURCE, STREAM_SOURCE, SPIN_SOURCE, OPS_SOURCE, STEP_SOURCE)
HEADERS = (SOURCE.parent / "bf16.h",)  # included by the sources: part of the build's cache key
ATTEND_MAX_POSITIONS = 1024  # beyond, torch's vectorized exp beats the C loop's expf
WAIT_MAX_FDS = 64  # sockets one spinning wait watches (SPIN_FDS_MAX in csrc/spinwait.c)
ABI_VERSION = 7
MAX_BATCH_ROWS = 8  # x rows a batched C product takes at once (ET_MAX_BATCH in csrc)
# reassociation lets the compiler vectorize the dot products' sums (rounding like a BLAS)
COMMON_FLAGS = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-fassociative-math",
                "-fno-signed-zeros", "-fno-trapping-math"]
LIBRARY_FLAGS = ["-pthread"]  # the pool's threads (not the kernel harness's concern)
X86 = ("x86_64", "AMD64", "i686", "i386")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_threads_wanted: int | None = None  # set_threads' last word: None means every usable core
_targets: dict[str, ctypes.CDLL | None] = {}  # library_for's, by target

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


def enabled() -> bool:
    """``EDGETP_NATIVE_KERNELS=0`` turns the C kernels off."""
    return settings.native_kernels_enabled()


def cache_dir() -> Path:
    return settings.kernel_cache_dir()


def _cpu_identity() -> str:
    """What the compiled code depends on: architecture and (on Linux) the CPU's feature flags."""
    parts = [platform.machine()]
    try:
        wanted = ["flags", "Features", "model name", "CPU part"]
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key in wanted:  # the first core's line of each (all cores are alike)
                parts.append(line)
                wanted.remove(key)
    except OSError:
        pass
    return "\n".join(parts)


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def arch_flags(target: str | None = None) -> tuple[list[str], ...]:
    """What makes the build this CPU's own, in the order tried: ``-march=native``, and on ARM
    ``-mcpu=native`` (some ARM compilers spell it so). Never a generic build: it would be
    cached as this CPU's and quietly run without its vector instructions; gcc on x86 takes
    ``-mcpu=native`` as a mere tuning hint, so it is not tried there. A ``target`` (default
    ``EDGETP_KERNEL_TARGET``) other than ``native`` is the one ``-march`` tried."""
    target = target or settings.kernel_target()
    if target != "native":
        return ([f"-march={target}"],)
    if platform.machine() in X86:
        return (["-march=native"],)
    return (["-march=native"], ["-mcpu=native"])


def build(compiler: str, target: Path, cpu_target: str | None = None) -> list[str]:
    """Compile the source into ``target`` for ``cpu_target`` (see :func:`arch_flags`) with the
    first flag set the compiler takes; returns those flags. Raises ``RuntimeError`` with the
    compiler's message when none works."""
    errors = []
    for arch in arch_flags(cpu_target):
        flags = COMMON_FLAGS + LIBRARY_FLAGS + arch
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            result = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(out)],
                                    capture_output=True, text=True, timeout=120)
            if result.returncode == 0:
                os.replace(out, target)  # atomic: concurrent builders all end with one file
                return flags
            errors.append(f"{' '.join(arch)}: {result.stderr.strip()[:300]}")
    raise RuntimeError("; ".join(errors))


def _load(cpu_target: str | None = None) -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler (set CC): decode uses torch's kernels, which are slower")
        return None
    try:
        arch = " | ".join(" ".join(flags) for flags in arch_flags(cpu_target))
        texts = [source.read_text() for source in (*SOURCES, *HEADERS)]
        key = hashlib.sha256("\n".join([*texts, compiler, " ".join(COMMON_FLAGS + LIBRARY_FLAGS),
                                        arch, _cpu_identity()]).encode()).hexdigest()[:16]
        target = cache_dir() / f"matvec-{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            flags = build(compiler, target, cpu_target)
            log.info("built the decode kernels with %s %s", compiler, " ".join(flags))
        library = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("native decode kernels unavailable (%s): decode uses torch's kernels", exc)
        return None
    if library.et_abi_version() != ABI_VERSION:
        log.warning("native kernel library %s is stale: delete it to rebuild", target)
        return None
    _declare(library)
    library.et_pool_set_threads(_threads_wanted or usable_cores())
    return library


def _declare(library: ctypes.CDLL) -> None:
    """Argument and result types of every function the library exports; ``et_par_*`` is the
    product ``et_*`` over the thread pool, with the same arguments."""
    library.et_kernel_paths.restype = ctypes.c_char_p
    library.et_stream_path.restype = ctypes.c_char_p
    library.et_stream_read.restype = ctypes.c_uint32
    library.et_stream_read.argtypes = [_P, _I64]
    library.et_wait_readable.restype = ctypes.c_int
    library.et_rmsnorm_f32.restype = None
    library.et_rmsnorm_f32.argtypes = [_P, _P, _P, _I64, ctypes.c_float]
    library.et_rmsnorm_rows.restype = None
    library.et_rmsnorm_rows.argtypes = [_P, _I64, _P, ctypes.c_int, _P, ctypes.c_int, _I64,
                                        _I64, ctypes.c_float]
    library.et_dequant_i4_bf16_t.restype = None
    library.et_dequant_i4_bf16_t.argtypes = [_P, _P, _I64, _P, _I64, _I64, _I64,
                                             ctypes.c_int]
    library.et_dequant_i8_blocks_bf16.restype = None
    library.et_dequant_i8_blocks_bf16.argtypes = [_P] * 4 + [_I64] * 2
    for name in ("et_attend_one_f32", "et_attend_one_bf16"):
        getattr(library, name).restype = None
        getattr(library, name).argtypes = [_P] * 7 + [_I64] * 5 + [ctypes.c_float, _P, _P]
    library.et_wait_readable.argtypes = [_P, ctypes.c_int, _I64, ctypes.c_int]
    for name in ("et_silu_mul_f32", "et_silu_mul_bf16", "et_add_f32", "et_add_f32_bf16"):
        getattr(library, name).restype = None
        getattr(library, name).argtypes = [_P, _P, _P, _I64] if "add" in name else [_P, _P, _I64]
    library.et_step_run.restype = _I64
    library.et_step_run.argtypes = [_P, _I64, _P, _P, _I64, _P, _P, _P, _P]
    library.et_exchange_f32.restype = _I64
    library.et_exchange_f32.argtypes = [ctypes.c_int, _P, _I64, _P, _I64, _P, _I64,
                                        ctypes.POINTER(ctypes.c_int)]
    for name in ("et_pool_set_threads", "et_pool_threads", "et_has_int4",
                 "et_stream_vector_bytes"):
        getattr(library, name).restype = ctypes.c_int
    library.et_pool_set_threads.argtypes = [ctypes.c_int]
    library.et_pool_jobs.restype = ctypes.c_int64
    library.et_add_block_lows.restype = ctypes.c_int
    library.et_add_block_lows.argtypes = [_P, _P, _P, _P, _I64, _I64]
    library.et_add_block_lows_rows.restype = ctypes.c_int
    library.et_add_block_lows_rows.argtypes = [_P, _P, _P, _P, _I64, _I64, _I64]
    for prefix in ("et_matvec_", "et_par_matvec_"):
        getattr(library, prefix + "f32").restype = None
        for name in ("bf16", "bf16_f32", "i8", "i8_b32", "i4", "i4_f32"):
            getattr(library, prefix + name).restype = ctypes.c_int
        for name in ("f32", "bf16", "bf16_f32", "i8", "i8_b32", "i4", "i4_f32"):
            getattr(library, prefix + name + "_rows").restype = ctypes.c_int
        for name in ("f32", "bf16", "bf16_f32"):  # w, x, y, rows, cols (, nx)
            getattr(library, prefix + name).argtypes = [_P, _P, _P, _I64, _I64]
            getattr(library, prefix + name + "_rows").argtypes = [_P, _P, _P, _I64, _I64, _I64]
        for name in ("i8", "i8_b32"):  # w, scale, x, y, rows, cols (, nx)
            getattr(library, prefix + name).argtypes = [_P, _P, _P, _P, _I64, _I64]
            getattr(library, prefix + name + "_rows").argtypes = [_P, _P, _P, _P, _I64, _I64,
                                                                  _I64]
        for name in ("i4", "i4_f32"):  # w, scale_zero, x, y, rows, cols, group (, nx)
            getattr(library, prefix + name).argtypes = [_P, _P, _P, _P, _I64, _I64, _I64]
            getattr(library, prefix + name + "_rows").argtypes = [_P, _P, _P, _P, _I64, _I64,
                                                                  _I64, _I64]


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; None when off (``EDGETP_NATIVE_KERNELS``
    at the first call: every product asks, so the environment is not read again) or
    unavailable."""
    global _library, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _library = _load() if enabled() else None
                _tried = True
    return _library


def available() -> bool:
    return library() is not None


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def set_threads(threads: int | None) -> int:
    """Threads each product runs on from now on (the caller's included): ``threads``, or every
    usable core for None. Returns the number in force (1 when the kernels are off)."""
    global _threads_wanted
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    _threads_wanted = threads
    lib = library()
    if lib is None:
        return 1
    return int(lib.et_pool_set_threads(threads or usable_cores()))


def threads() -> int:
    """Threads each product runs on now (1 when the kernels are off)."""
    lib = library()
    return 1 if lib is None else int(lib.et_pool_threads())


def pool_jobs() -> int:
    """How many products the pool has split over its threads in this process so far."""
    lib = library()
    return 0 if lib is None else int(lib.et_pool_jobs())


def stream_read(buffer: torch.Tensor) -> int:
    """Read every byte of a contiguous CPU tensor once with the streaming reader (vector
    accumulators as wide as the build's target); returns their 32-bit sum. Raises
    ``RuntimeError`` when the kernels are off or unavailable."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are off or unavailable: no streaming reader")
    if not buffer.is_contiguous() or buffer.device.type != "cpu":
        raise ValueError("stream_read takes a contiguous CPU tensor")
    return int(lib.et_stream_read(buffer.data_ptr(), buffer.numel() * buffer.element_size()))


def wait_readable(fds: Sequence[int], spin_s: float, timeout_s: float = 0.0) -> int | None:
    """The index of the first of ``fds`` that is readable (or hung up): checked without
    blocking, pausing between checks, for up to ``spin_s``, then waited for in poll(2) for up
    to ``timeout_s`` more, without the GIL (``csrc/spinwait.c``). None when none became readable
    in time or a signal interrupted the wait. Raises ``RuntimeError`` when the kernels are off
    or unavailable, ``OSError`` when poll fails."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are off or unavailable: no spinning wait")
    array = (ctypes.c_int * len(fds))(*fds)
    got = int(lib.et_wait_readable(array, len(fds), int(spin_s * 1e9),
                                   max(0, math.ceil(timeout_s * 1000))))
    if got <= -2:
        raise OSError(-2 - got, os.strerror(-2 - got))
    return None if got < 0 else got


def exchange_f32(fd: int, header: bytes, own: torch.Tensor, into: torch.Tensor,
                 spin_s: float) -> tuple[int, bool]:
    """One end of a two-rank exchange on the connected socket ``fd`` (``csrc/spinwait.c``),
    without the GIL: send ``header`` and ``own`` (float32, contiguous) as one message, then
    read the peer's message into ``into`` (uint8, header and payload: ``len(header) +
    4 * own.numel()`` bytes) for up to ``spin_s``. Returns (bytes read into ``into``, whether
    the whole message came with a header equal to ``header``: its payload then holds the sum).
    Raises ``RuntimeError`` when the library is unavailable, ``OSError`` when the socket
    failed (``ECONNRESET``: the peer closed it)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are off or unavailable: no native exchange")
    summed = ctypes.c_int(0)
    got = int(lib.et_exchange_f32(fd, header, len(header), own.data_ptr(), own.numel(),
                                  into.data_ptr(), int(spin_s * 1e9), ctypes.byref(summed)))
    if got < 0:
        raise OSError(-got, os.strerror(-got))
    return got, bool(summed.value)


def rmsnorm_row(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> bool:
    """``out`` = RMSNorm of one float32 row ``x`` [1, d] with ``weight`` [d] (``csrc/
    decode_ops.c``); False (nothing done) when the C library is unavailable."""
    lib = library()
    if lib is None:
        return False
    lib.et_rmsnorm_f32(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[-1], eps)
    return True


def rmsnorm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> bool:
    """``out`` [T, d] = RMSNorm of float32 rows ``x`` [T, d] (rows contiguous, any row
    stride) with ``weight`` [d], each of ``weight`` and ``out`` float32 or bfloat16 (``out``
    contiguous; ``csrc/decode_ops.c``: a float32 row's values are :func:`rmsnorm_row`'s);
    False (nothing done) when the C library is unavailable or the dtypes are others."""
    lib = library()
    pair = (torch.float32, torch.bfloat16)
    if (lib is None or x.dtype != torch.float32 or weight.dtype not in pair
            or out.dtype not in pair or x.stride(-1) != 1 or not weight.is_contiguous()
            or not out.is_contiguous()):
        return False
    lib.et_rmsnorm_rows(x.data_ptr(), x.stride(0), weight.data_ptr(),
                        int(weight.dtype == torch.bfloat16), out.data_ptr(),
                        int(out.dtype == torch.bfloat16), x.shape[0], x.shape[-1], eps)
    return True


COMPUTE_DTYPES = (torch.float32, torch.bfloat16)  # the dtypes of the decode step's C ops


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """``gate`` = silu(gate) * up in place, float32 or bfloat16 rows [T, n] (contiguous, one
    dtype; bfloat16 rounded where torch's bfloat16 ops round), every element by the same
    scalar code (``csrc/step.c``), so a row's values do not depend on the rows beside it;
    False (nothing done) when the C library is unavailable or the tensors are others."""
    lib = library()
    if (lib is None or gate.dtype not in COMPUTE_DTYPES or up.dtype != gate.dtype
            or gate.shape != up.shape or not gate.is_contiguous() or not up.is_contiguous()):
        return False
    kernel = lib.et_silu_mul_f32 if gate.dtype == torch.float32 else lib.et_silu_mul_bf16
    kernel(gate.data_ptr(), up.data_ptr(), gate.numel())
    return True


def add_rows(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` = a + b, float32 ``a`` and ``out`` and a float32 or bfloat16 ``b`` of one shape,
    contiguous (``csrc/step.c``: a loop and a ctypes call, where torch's dispatch costs tens of
    microseconds with its code out of the caches between two decode products); torch.add (the
    same bits) without the library."""
    lib = library()
    if (lib is None or b.dtype not in COMPUTE_DTYPES
            or not all(t.is_contiguous() and t.numel() == out.numel() for t in (a, b, out))
            or a.dtype != torch.float32 or out.dtype != torch.float32):
        return torch.add(a, b, out=out)
    kernel = lib.et_add_f32 if b.dtype == torch.float32 else lib.et_add_f32_bf16
    kernel(a.data_ptr(), b.data_ptr(), out.data_ptr(), out.numel())
    return out


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               caches: tuple[torch.Tensor, torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
               position: int, scale: float, scratch: torch.Tensor, out: torch.Tensor) -> bool:
    """One query position's attention in one call (``csrc/decode_ops.c``): RoPE on q [1, H, hd]
    and k [1, KV, hd] in place, k and v into the ``caches`` ([KV, S, hd] each) at ``position``,
    softmax(q . keys * scale) . values over positions 0..position into ``out`` [H * hd], each
    query head reading KV head ``h // (H // KV)``. q, k, v, the caches and ``out`` are all
    float32 or all bfloat16 (RoPE rounded as the model's bfloat16 :func:`apply_rope`, the
    attention in float32, ``out`` rounded once); ``cos``, ``sin``: float32 [1, hd];
    ``scratch``: float32, at least position + 1 values. False (nothing done) when the library
    is unavailable, the dtypes are others, or ``position`` is past the cache or
    :data:`ATTEND_MAX_POSITIONS`."""
    lib = library()
    k_cache, v_cache = caches
    if lib is None or not 0 <= position < min(ATTEND_MAX_POSITIONS, k_cache.shape[1]):
        return False  # past the cache: the torch path's slice assignment says so
    dtype = q.dtype
    if (dtype not in COMPUTE_DTYPES or any(t.dtype != dtype for t in (k, v, k_cache, v_cache, out))
            or scratch.dtype != torch.float32):
        return False
    heads, kv_heads, hd = q.shape[-2], k.shape[-2], q.shape[-1]
    kernel = lib.et_attend_one_f32 if dtype == torch.float32 else lib.et_attend_one_bf16
    kernel(q.data_ptr(), k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
           cos.data_ptr(), sin.data_ptr(), heads, kv_heads, hd, position, k_cache.shape[1],
           scale, scratch.data_ptr(), out.data_ptr())
    return True


def int4_bfloat16_transposed(packed: torch.Tensor, scale_zero: torch.Tensor, group: int,
                             tiled: bool, out: torch.Tensor | None = None
                             ) -> torch.Tensor | None:
    """int4 rows ``packed`` [rows, in / 2] (whole 64-row blocks of the tiled layout from the
    tensor's start, or its tail; or the rows layout) with ``scale_zero`` [in / group, rows, 2]
    -> bfloat16 [in, rows], the weight transposed ((code - 8) * scale + zero, rounded once;
    ``csrc/decode_ops.c``), into ``out`` (contiguous [in, rows]) if given, for a prefill
    chunk's ``x @ W^T``. None without the library."""
    lib = library()
    if lib is None:
        return None
    rows, cols = packed.shape[0], packed.shape[1] * 2
    pairs = scale_zero.to(torch.bfloat16)  # [ng, rows, 2]: a slice of rows keeps its strides
    if pairs.stride(1) != 2 or pairs.stride(2) != 1:
        pairs = pairs.contiguous()
    packed = packed.contiguous()
    out = torch.empty(cols, rows, dtype=torch.bfloat16) if out is None else out  # [in, rows]
    lib.et_dequant_i4_bf16_t(packed.data_ptr(), pairs.data_ptr(), pairs.stride(0),
                             out.data_ptr(), rows, cols, group, int(tiled))
    return out


def int8_blocks_bfloat16(codes: torch.Tensor, scales: torch.Tensor,
                         out: torch.Tensor | None = None) -> torch.Tensor | None:
    """int8 ``codes`` [rows, in] with block scales (``edgetp.shard.quant``'s layouts: [2, rows,
    in / 32] scale and low, or [rows, in / 32] symmetric) -> bfloat16 [rows, in], computed in
    float32 and rounded once (``csrc/decode_ops.c``), into ``out`` (contiguous) if given, for
    a prefill chunk's ``x @ W^T``. None without the library."""
    lib = library()
    if lib is None:
        return None
    pairs = scales.float()
    scale, low = (pairs[0], pairs[1]) if scales.dim() == 3 else (pairs, None)
    scale = scale.contiguous()  # [rows, in / 32]
    low = None if low is None else low.contiguous()
    codes = codes.contiguous()
    out = torch.empty(codes.shape, dtype=torch.bfloat16) if out is None else out  # [rows, in]
    lib.et_dequant_i8_blocks_bf16(codes.data_ptr(), scale.data_ptr(),
                                  None if low is None else low.data_ptr(), out.data_ptr(),
                                  codes.shape[0], codes.shape[1])
    return out


def stream_path() -> str:
    """The streaming reader's vectors: ``avx512``, ``avx2``, ``neon`` or ``generic``."""
    lib = library()
    return "none" if lib is None else lib.et_stream_path().decode()


def library_for(cpu_target: str) -> ctypes.CDLL | None:
    """The kernels built for ``cpu_target`` (a ``-march`` value, ``native`` included) beside the
    runtime's own, for comparisons (``benchmarks/quant_kernels.py --target``); None when the
    build fails. Cached like the runtime's library."""
    with _lock:
        if cpu_target not in _targets:
            _targets[cpu_target] = _load(cpu_target)
        return _targets[cpu_target]


def batch_rows(x: torch.Tensor) -> bool:
    """Whether ``x`` [T, in] has rows the batched C products take: 1..MAX_BATCH_ROWS, contiguous,
    on the CPU."""
    return (x.dim() == 2 and 1 <= x.shape[0] <= MAX_BATCH_ROWS and x.is_contiguous()
            and x.device.type == "cpu")


def _kernel_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A product the C loops take: 1..MAX_BATCH_ROWS contiguous rows against a contiguous 2-D
    CPU weight of their width."""
    return (batch_rows(x) and weight.dim() == 2 and weight.is_contiguous()
            and weight.device.type == "cpu" and x.shape[1] == weight.shape[1])


def _one_float_row(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None) -> bool:
    """Whether ``linear`` is a float32 decode step's product into a kept buffer (the library
    loaded already): x [1, in], weight [out, in] and ``out`` [1, out], all float32, contiguous
    and on the CPU, checked in as few calls as the hot path can afford (each costs
    microseconds with the caches full of weights)."""
    return (_library is not None and out is not None and x.dtype is torch.float32
            and weight.dtype is torch.float32 and out.dtype is torch.float32
            and x.shape[0] == 1 and x.dim() == 2 and weight.dim() == 2
            and out.shape == (1, weight.shape[0]) and x.shape[1] == weight.shape[1]
            and x.is_contiguous() and weight.is_contiguous() and not weight.is_meta
            and weight.device.type == "cpu")


def output(buffer: torch.Tensor | None, rows: int, dtype: torch.dtype, batch: int = 1
           ) -> torch.Tensor:
    """``buffer`` if it is a [batch, rows] tensor of ``dtype``, else a new one."""
    if buffer is not None and buffer.shape == (batch, rows) and buffer.dtype == dtype:
        return buffer
    return torch.empty(batch, rows, dtype=dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None
           ) -> torch.Tensor:
    """x [T, in] @ weight [out, in]^T -> [T, out] (no bias), like ``F.linear``.

    Up to MAX_BATCH_ROWS float32 or bfloat16 rows with the weight's dtype go through C into
    ``out`` (reused when it fits, see :func:`output`), each row bitwise its one-row product;
    anything else is ``F.linear``.
    """
    if _one_float_row(x, weight, out):  # a float32 decode step's: the fewest checks
        assert _library is not None and out is not None
        _library.et_par_matvec_f32_rows(weight.data_ptr(), x.data_ptr(), out.data_ptr(),
                                        out.shape[1], x.shape[1], 1)
        return out
    lib = library()
    if lib is None or not _kernel_rows(x, weight) or x.dtype != weight.dtype:
        return F.linear(x, weight)
    (rows, cols), batch = weight.shape, x.shape[0]
    if x.dtype == torch.float32:
        y = output(out, rows, torch.float32, batch)
        lib.et_par_matvec_f32_rows(weight.data_ptr(), x.data_ptr(), y.data_ptr(), rows, cols,
                                   batch)
        return y
    if x.dtype == torch.bfloat16:
        y = output(out, rows, torch.bfloat16, batch)
        if lib.et_par_matvec_bf16_rows(weight.data_ptr(), x.data_ptr(), y.data_ptr(), rows, cols,
                                       batch) == 0:
            return y
    return F.linear(x, weight)


FLOAT_CHUNK_ROWS = 4096  # rows of a bfloat16 weight widened to float32 at a time (fallback)


def float_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ weight [out, in]^T -> float32 [T, out], never rounded to a narrower dtype.

    For logits: a float32 weight is a plain float32 product; a bfloat16 (or float16) weight
    multiplies x in the weight's dtype (as the compute mode does) but keeps the float32 sums,
    through C for up to MAX_BATCH_ROWS rows (each bitwise its one-row product), else widening
    ``FLOAT_CHUNK_ROWS`` weight rows at a time (the products of two bfloat16 values are exact in
    float32, so this is the same sum).
    """
    if weight.dtype == torch.float32:
        return linear(x.float().contiguous(), weight)
    x = x.to(weight.dtype).contiguous()
    lib = library()
    if lib is not None and weight.dtype == torch.bfloat16 and _kernel_rows(x, weight):
        rows, cols = weight.shape
        y = torch.empty(x.shape[0], rows, dtype=torch.float32)  # [T, out]
        if lib.et_par_matvec_bf16_f32_rows(weight.data_ptr(), x.data_ptr(), y.data_ptr(), rows,
                                           cols, x.shape[0]) == 0:
            return y
    x32 = x.float()
    return torch.cat([F.linear(x32, weight[start : start + FLOAT_CHUNK_ROWS].float())
                      for start in range(0, weight.shape[0], FLOAT_CHUNK_ROWS)], dim=-1)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [T, in] float32 @ dequant(q int8 [out, in], scale)^T -> [T, out] float32, T up to
    MAX_BATCH_ROWS (each row bitwise its one-row product); ``scale`` is bfloat16 [out] (one per
    row), float16 [out, in / 32] (one per row and 32 columns) or float16 [2, out, in / 32] (a
    scale and a low end per block, edgetp.shard.quant).

    x is quantized to int16 per 64 columns (see ``csrc/matvec.c``); None when the C loops cannot
    take the product."""
    lib = library()
    if (lib is None or not _kernel_rows(x, q) or x.dtype != torch.float32
            or q.dtype != torch.int8 or not scale.is_contiguous()):
        return None
    rows, cols = q.shape
    form = int8_scale_form(scale, rows, cols)
    if form is None:
        return None
    if form == "lows":
        return _int8_low_blocks(x, q, scale, out)
    kernel = lib.et_par_matvec_i8_rows if form == "rows" else lib.et_par_matvec_i8_b32_rows
    y = output(out, rows, torch.float32, x.shape[0])  # [T, out]
    if kernel(q.data_ptr(), scale.data_ptr(), x.data_ptr(), y.data_ptr(), rows, cols,
              x.shape[0]) != 0:
        return None  # no memory for x's int16 copy, or columns not whole blocks
    return y


def int8_scale_form(scale: torch.Tensor, rows: int, cols: int) -> str | None:
    """Which kernel takes an int8 [rows, cols] weight with ``scale``: ``"rows"`` (bfloat16
    [rows]), ``"blocks"`` (float16 [rows, cols / 32]) or ``"lows"`` (float16 [2, rows, cols /
    32]: scales and low ends); None when none does. The one rule :func:`int8_linear` and the
    step programs (``edgetp.parallel.qlinear``) both follow."""
    if scale.dtype == torch.bfloat16 and scale.numel() == rows:
        return "rows"
    if scale.dtype != torch.float16 or cols % 32:
        return None
    blocks = (rows, cols // 32)
    if tuple(scale.shape) == blocks:
        return "blocks"
    return "lows" if tuple(scale.shape) == (2, *blocks) else None


def int4_pairs_fit(scale_zero: torch.Tensor, rows: int, cols: int, group: int) -> bool:
    """Whether :func:`int4_linear`'s kernels take ``scale_zero`` for an int4 [rows, cols]
    weight: bfloat16 or float32 (scale, zero) pairs [cols / group, rows, 2], contiguous."""
    return (scale_zero.dtype in (torch.bfloat16, torch.float32) and scale_zero.is_contiguous()
            and tuple(scale_zero.shape) == (cols // group, rows, 2))


def _int8_low_blocks(x: torch.Tensor, q: torch.Tensor, scale_low: torch.Tensor,
                     out: torch.Tensor | None) -> torch.Tensor | None:
    """x [T, in] @ ((q + 128) * scale + low)^T, per 32-column block: the symmetric block
    product ``q * scale`` (et_matvec_i8_b32_rows), then each block's ``low + 128 * scale``
    times the block's sum of x (et_add_block_lows_rows, 1/32 of the work; x's block sums
    taken there too)."""
    rows, cols = q.shape
    y = int8_linear(x, q, scale_low[0], out)  # [T, out]
    lib = library()
    if y is None or lib is None:
        return None
    if lib.et_add_block_lows_rows(scale_low[0].data_ptr(), scale_low[1].data_ptr(),
                                  x.data_ptr(), y.data_ptr(), rows, cols // 32, x.shape[0]) != 0:
        return None  # no memory for x's block sums
    return y


def kernel_paths(lib: ctypes.CDLL | None = None) -> dict[str, str]:
    """product -> the path the loaded library (or ``lib``) takes for it (``{"f32": "avx512",
    "i4": "avx2", ...}``, see ``et_kernel_paths`` in ``csrc/matvec.c``); every product "torch"
    when the C kernels are off or unavailable."""
    lib = lib or library()
    if lib is None:
        return {product: "torch" for product in ("f32", "bf16", "i8", "i8_b32", "i4")}
    words = lib.et_kernel_paths().decode().split()
    return dict(word.split(":", 1) for word in words)


def has_int4() -> bool:
    """Whether the int4 product is built here: wherever the C kernels are (AVX-512 VNNI, AVX2,
    NEON, or the plain C loops)."""
    lib = library()
    return lib is not None and bool(lib.et_has_int4())


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group: int,
                out: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [T, in] float32 @ dequant(packed uint8 [out, in / 2] in the *tiled* layout,
    scale_zero bfloat16 or float32 [in / group, out, 2])^T -> [T, out] float32, T up to
    MAX_BATCH_ROWS (each row bitwise its one-row product).

    x is quantized to int16 per 64 columns, as for int8. None when the C loops cannot take the
    product (no C kernels, a shape the tiled layout does not have)."""
    lib = library()
    kernels = {torch.bfloat16: "et_par_matvec_i4_rows", torch.float32: "et_par_matvec_i4_f32_rows"}
    if (lib is None or not has_int4() or not batch_rows(x) or x.dtype != torch.float32
            or packed.dtype != torch.uint8 or not packed.is_contiguous()
            or packed.dim() != 2 or x.shape[1] != 2 * packed.shape[1]
            or not int4_pairs_fit(scale_zero, packed.shape[0], x.shape[1], group)):
        return None
    rows, cols = packed.shape[0], x.shape[1]
    y = output(out, rows, torch.float32, x.shape[0])  # [T, out]
    kernel = getattr(lib, kernels[scale_zero.dtype])
    if kernel(packed.data_ptr(), scale_zero.data_ptr(), x.data_ptr(), y.data_ptr(), rows, cols,
              group, x.shape[0]) != 0:
        return None
    return y


class StepOutput:
    """Mixin for decode linears: a one-row product is written into a buffer the linear keeps
    from step to step. Only for linears whose output is used up within the step (a layer's
    projections, set by ``edgetp.parallel.linears.shard_model``); never the lm_head, whose logits
    callers keep."""

    reuse_output = False

    def output_buffer(self, x: torch.Tensor, rows: int) -> torch.Tensor | None:
        """The kept [1, rows] buffer (in x's dtype, the result's in every C product) for a
        one-row ``x``; None when this linear does not reuse its output or x has more rows."""
        if not self.reuse_output or x.shape[0] != 1:
            return None
        return step_buffer(self, "_step_output", (1, rows), x)  # type: ignore[arg-type]
