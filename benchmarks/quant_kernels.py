"""Microseconds per matrix-vector product for each weight format and code path, on this CPU.

Run::

    .venv/bin/python benchmarks/quant_kernels.py [--threads 1] [--quick] [--json]
    .venv/bin/python benchmarks/quant_kernels.py --target x86-64-v3 [--quick] [--json]
    .venv/bin/python benchmarks/quant_kernels.py --rows [--target x86-64-v3] [--json]

For each shape ``[out, in]`` (a 1B-ish attention projection, its MLP up and down, a 7B-ish
square) and one activation row, the best-of-rounds time of:

* ``f32``: ``F.linear`` on float32 weights and activations (the baseline);
* ``bf16``: ``F.linear`` on bfloat16 weights and activations;
* ``int8 kernel``: ``edgetp.parallel.qlinear.int8_matmul``
  (``_weight_int8pack_mm``, float32 in and out,
  bfloat16 inside); ``int8 kernel f32``: the same op fed float32 activations (why edgetp does
  not); ``int8 fallback``: dequantize to float32 + ``F.linear`` (``EDGETP_QUANT_KERNELS=0``);
* ``w8a8 _int_mm``: activations quantized to int8 per row, ``torch._int_mm`` (VNNI) and both
  scales: measured for comparison, *not* used by edgetp (it quantizes the activations of
  every linear, which real LLMs' outlier features make lossy);
* ``f32 / bf16 / int8 / int4 native``: edgetp's C decode kernels
  (``edgetp.kernels.native``; what a decode
  step runs where a C compiler is available; int8 with int16 activation blocks);
  ``int8 blocks native``: the same for the format an int8 split stores (a float16 scale and
  low end per 32 columns: the block kernel plus the low ends' term);
* ``int4 kernel``: ``int4_matmul`` on the tiled layout (``_weight_int4pack_mm_for_cpu``);
  ``int4 fallback``: unpack, dequantize, ``F.linear`` in float32.

Then, for prefill, the rows at which dequantize + a bfloat16 matmul beats the int8/int4
kernels (``edgetp.parallel.qlinear.GEMM_ROWS``). Weight bytes per format are printed too. Numbers
are noisy on a shared machine: every figure is the best of several rounds.

``--target T`` instead builds the C kernels for ``-march=T`` beside the native build and prints
each product's GB/s (weight and scale bytes per second) for both and their ratio, the two
builds timed in alternating rounds so load from elsewhere hits both alike.

``--rows`` times the batched C products (``et_matvec_*_rows``, one thread) on a 4096x4096
weight for 1, 2, 4 and 8 rows of x: microseconds per call and per row, for the native build
and (with ``--target``) that target's, in alternating rounds; the CPU's vector flags first.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from edgetp.kernels import native as kernels
from edgetp.parallel.qlinear import int4_matmul, int8_matmul
from edgetp.shard.quant import (
    dequantize_int4,
    native_int4_tiled,
    quantize_int4,
    quantize_int8,
    quantize_int8_blocks,
)

SHAPES = {"attn 2048x2048": (2048, 2048), "mlp up 5632x2048": (5632, 2048),
          "mlp down 2048x5632": (2048, 5632), "square 4096x4096": (4096, 4096)}
QUICK_SHAPES = {"attn 1024x1024": (1024, 1024), "mlp up 2816x1024": (2816, 1024)}
ROWS = (1, 4, 8, 16, 32, 64)
BATCH_ROWS = (1, 2, 4, 8)  # x rows per batched product (--rows)
BATCH_SHAPE = (4096, 4096)
VECTOR_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni",
                "avx512_bf16", "asimd", "asimddp", "i8mm")


def best_us(fn: Callable[[], object], budget_s: float) -> float:
    """Best mean time per call over several rounds, in microseconds."""
    fn()
    started = time.perf_counter()
    fn()
    once = max(time.perf_counter() - started, 1e-6)
    calls = max(1, min(200, int(budget_s / 5 / once)))
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e6


def w8a8(x: torch.Tensor, q_t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 activations (per-row scale) x int8 weights on VNNI: measured, not used by edgetp."""
    row_scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / 127  # [T, 1]
    codes = torch.round(x / row_scale).clamp_(-127, 127).to(torch.int8)
    return torch._int_mm(codes, q_t).float() * row_scale * scale.float()


def one_shape(out_features: int, in_features: int, budget_s: float) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    x = torch.randn(1, in_features, generator=gen)
    wb, xb = w.to(torch.bfloat16), x.to(torch.bfloat16)
    q, scale = quantize_int8(w)
    qb, scale_low = quantize_int8_blocks(w)  # what an int8 split stores
    packed, scale_zero = quantize_int4(w, 32)
    tiled = native_int4_tiled()
    q_t = q.t()  # [in, out] view: what torch._int_mm wants
    native = kernels.available()
    step, step16 = torch.empty(1, out_features), torch.empty(1, out_features).bfloat16()

    def int4_fallback() -> torch.Tensor:
        return F.linear(x, dequantize_int4(packed, scale_zero))

    paths: dict[str, Callable[[], object]] = {
        "f32": lambda: F.linear(x, w),
        "bf16": lambda: F.linear(xb, wb),
        "int8 kernel": lambda: int8_matmul(x, q, scale, kernel=True),
        "int8 kernel f32": lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale.float()),
        "int8 fallback": lambda: int8_matmul(x, q, scale, kernel=False),
        "w8a8 _int_mm": lambda: w8a8(x, q_t, scale),
        "f32 native": (lambda: kernels.linear(x, w, step)) if native else None,
        "bf16 native": (lambda: kernels.linear(xb, wb, step16)) if native else None,
        "int8 native": (lambda: kernels.int8_linear(x, q, scale, step)) if native else None,
        "int8 blocks native": (lambda: kernels.int8_linear(x, qb, scale_low, step))
        if native else None,
        "int4 native": (lambda: kernels.int4_linear(x, packed, scale_zero, 32, step))
        if kernels.has_int4() else None,
        "int4 kernel": (lambda: int4_matmul(x, packed, scale_zero, 32, kernel_layout=True))
        if tiled else None,
        "int4 fallback": int4_fallback,
    }
    return {name: best_us(fn, budget_s) for name, fn in paths.items() if fn is not None}


def crossover(out_features: int, in_features: int, budget_s: float) -> dict[str, dict]:
    """Per row count: kernel vs dequantize + bf16 matmul, int8 and int4 (microseconds)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    q, scale = quantize_int8(w)
    packed, scale_zero = quantize_int4(w, 32)
    out: dict[str, dict] = {}
    for rows in ROWS:
        xb = torch.randn(rows, in_features, generator=gen).to(torch.bfloat16)
        out[str(rows)] = paths_for_rows(xb, q, scale, packed, scale_zero, budget_s)
    return out


def paths_for_rows(xb: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                   packed: torch.Tensor, scale_zero: torch.Tensor, budget_s: float) -> dict:
    int4_kernel = float("nan")
    if native_int4_tiled():
        int4_kernel = best_us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            xb, packed, 32, scale_zero), budget_s)
    return {
        "int8 kernel": best_us(lambda: torch.ops.aten._weight_int8pack_mm(xb, q, scale),
                               budget_s),
        "int8 gemm": best_us(lambda: F.linear(xb, q.to(torch.bfloat16)) * scale, budget_s),
        "int4 kernel": int4_kernel,
        "int4 gemm": best_us(lambda: F.linear(xb, dequantize_int4(
            packed, scale_zero, torch.bfloat16)), budget_s),
    }


def product_calls(lib: ctypes.CDLL, out_features: int, in_features: int
                  ) -> dict[str, tuple[Callable[[], object], int]]:
    """product -> (one call of ``lib``'s C kernel on a [out, in] weight, its weight and scale
    bytes). The tensors live in the closures."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    x = torch.randn(1, in_features, generator=gen)
    wb, xb = w.bfloat16(), x.bfloat16()
    q, scale = quantize_int8(w)
    block_scale = (scale.float()[:, None] * torch.ones(in_features // 32)).half()  # [out, in/32]
    packed, scale_zero = quantize_int4(w, 32)
    y, yb = torch.empty(1, out_features), torch.empty(1, out_features, dtype=torch.bfloat16)
    rows, cols = out_features, in_features

    def ptr(t: torch.Tensor) -> ctypes.c_void_p:
        return ctypes.c_void_p(t.data_ptr())

    def nbytes(*tensors: torch.Tensor) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    return {
        "f32": (lambda: lib.et_matvec_f32(ptr(w), ptr(x), ptr(y), rows, cols), nbytes(w)),
        "bf16": (lambda: lib.et_matvec_bf16(ptr(wb), ptr(xb), ptr(yb), rows, cols), nbytes(wb)),
        "i8": (lambda: lib.et_matvec_i8(ptr(q), ptr(scale), ptr(x), ptr(y), rows, cols),
               nbytes(q, scale)),
        "i8_b32": (lambda: lib.et_matvec_i8_b32(ptr(q), ptr(block_scale), ptr(x), ptr(y), rows,
                                                cols), nbytes(q, block_scale)),
        "i4": (lambda: lib.et_matvec_i4(ptr(packed), ptr(scale_zero), ptr(x), ptr(y), rows,
                                        cols, 32), nbytes(packed, scale_zero)),
    }


def target_rates(target: str, shapes: dict[str, tuple[int, int]], budget_s: float) -> dict:
    """Per product and shape, GB/s of the native build and of the ``target`` build."""
    libs = {"native": kernels.library_for("native"), target: kernels.library_for(target)}
    if any(lib is None for lib in libs.values()):
        raise SystemExit(f"could not build the kernels for {', '.join(libs)} (see the log)")
    paths = {name: kernels.kernel_paths(lib) for name, lib in libs.items()}
    rates: dict[str, dict[str, dict[str, float]]] = {}
    for label, shape in shapes.items():
        calls = {name: product_calls(lib, *shape) for name, lib in libs.items()}  # type: ignore[arg-type]
        for product in calls["native"]:
            best = dict.fromkeys(libs, float("inf"))
            for _ in range(3):  # alternating rounds: both builds see the same load
                for name in libs:
                    fn, _ = calls[name][product]
                    best[name] = min(best[name], best_us(fn, budget_s / 3))
            size = calls["native"][product][1]
            rates.setdefault(product, {})[label] = {n: size / us / 1e3 for n, us in best.items()}
    return {"target": target, "paths": paths, "gb_per_s": rates}


def print_target_rates(result: dict) -> None:
    target, paths = result["target"], result["paths"]
    print(f"decode kernels: native ({' '.join(f'{k}:{v}' for k, v in paths['native'].items())})"
          f" vs {target} ({' '.join(f'{k}:{v}' for k, v in paths[target].items())})")
    print(f"\n| product | shape | native GB/s | {target} GB/s | ratio |\n|---|---|---|---|---|")
    for product, per_shape in result["gb_per_s"].items():
        ratios = []
        for label, rate in per_shape.items():
            ratios.append(rate[target] / rate["native"])
            print(f"| {product} | {label} | {rate['native']:.1f} | {rate[target]:.1f} | "
                  f"{ratios[-1]:.2f} |")
        print(f"| {product} | geometric mean | | | "
              f"{float(torch.tensor(ratios).log().mean().exp()):.2f} |")


def cpu_flags() -> list[str]:
    """The vector features of this CPU the kernels' paths depend on (Linux /proc/cpuinfo)."""
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return []
    words = next((line.split(":", 1)[1].split() for line in lines
                  if line.split(":", 1)[0].strip() in ("flags", "Features")), [])
    return [flag for flag in VECTOR_FLAGS if flag in words]


def batch_calls(lib: ctypes.CDLL, out_features: int, in_features: int
                ) -> dict[str, Callable[[int], object]]:
    """product -> a call of ``lib``'s one-thread batched kernel on the first T of 8 rows of x
    (the tensors live in the closures)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    x = torch.randn(max(BATCH_ROWS), in_features, generator=gen)  # [8, in]
    wb, xb = w.bfloat16(), x.bfloat16()
    q, scale = quantize_int8(w)
    qb, scale_low = quantize_int8_blocks(w)  # [out, in], [2, out, in / 32]
    packed, scale_zero = quantize_int4(w, 32)
    y = torch.empty(max(BATCH_ROWS), out_features)  # [8, out]
    yb = y.bfloat16()
    rows, cols, nb = out_features, in_features, in_features // 32
    tensors = {"w": w, "x": x, "wb": wb, "xb": xb, "q": q, "scale": scale, "qb": qb,
               "s": scale_low[0], "low": scale_low[1], "packed": packed, "sz": scale_zero,
               "y": y, "yb": yb}  # kept alive by the closures below
    p = {name: ctypes.c_void_p(t.data_ptr()) for name, t in tensors.items()}
    p["keep"] = tensors  # type: ignore[assignment]

    def low_ends(t: int) -> None:
        lib.et_matvec_i8_b32_rows(p["qb"], p["s"], p["x"], p["y"], rows, cols, t)
        lib.et_add_block_lows_rows(p["s"], p["low"], p["x"], p["y"], rows, nb, t)

    return {
        "f32": lambda t: lib.et_matvec_f32_rows(p["w"], p["x"], p["y"], rows, cols, t),
        "bf16": lambda t: lib.et_matvec_bf16_rows(p["wb"], p["xb"], p["yb"], rows, cols, t),
        "i8": lambda t: lib.et_matvec_i8_rows(p["q"], p["scale"], p["x"], p["y"], rows, cols, t),
        "i8_b32": lambda t: lib.et_matvec_i8_b32_rows(p["qb"], p["s"], p["x"], p["y"], rows,
                                                      cols, t),
        "i8 low ends": low_ends,
        "i4": lambda t: lib.et_matvec_i4_rows(p["packed"], p["sz"], p["x"], p["y"], rows, cols,
                                              32, t),
    }


def batch_costs(targets: list[str], budget_s: float) -> dict:
    """Per build, product and row count: microseconds per batched call (best of rounds, the
    builds alternating)."""
    libs = {target: kernels.library_for(target) for target in targets}
    if any(lib is None for lib in libs.values()):
        raise SystemExit(f"could not build the kernels for {', '.join(libs)} (see the log)")
    calls = {name: batch_calls(lib, *BATCH_SHAPE) for name, lib in libs.items()}  # type: ignore[arg-type]
    us: dict[str, dict[str, dict[int, float]]] = {name: {} for name in libs}
    for product in calls[targets[0]]:
        for rows in BATCH_ROWS:
            for _ in range(3):  # alternating rounds: every build sees the same load
                for name in libs:
                    fn = calls[name][product]
                    best = best_us(functools.partial(fn, rows), budget_s / 3)
                    cell = us[name].setdefault(product, {})
                    cell[rows] = min(cell.get(rows, float("inf")), best)
    paths = {name: kernels.kernel_paths(lib) for name, lib in libs.items()}
    return {"shape": BATCH_SHAPE, "cpu_flags": cpu_flags(), "paths": paths, "us": us}


def print_batch_costs(result: dict) -> None:
    rows_out, cols = result["shape"]
    print(f"cpu flags: {' '.join(result['cpu_flags'])}")
    for name, paths in result["paths"].items():
        print(f"{name} build: {' '.join(f'{k}:{v}' for k, v in paths.items())}")
    heads = " | ".join(f"{n} row{'s' if n > 1 else ''}: us (per row)" for n in BATCH_ROWS)
    print(f"\nbatched products on {rows_out}x{cols}, one thread\n")
    print(f"| build | product | {heads} | 8 rows per row / 1 row |")
    print("|---" * (len(BATCH_ROWS) + 3) + "|")
    for name, products in result["us"].items():
        for product, cells in products.items():
            text = " | ".join(f"{cells[n]:.0f} ({cells[n] / n:.0f})" for n in BATCH_ROWS)
            last = max(BATCH_ROWS)
            print(f"| {name} | {product} | {text} | {cells[last] / last / cells[1]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--target", default=None,
                        help="a -march target: its C kernels' GB/s beside the native build's")
    parser.add_argument("--rows", action="store_true",
                        help="the batched products' cost for 1, 2, 4 and 8 rows of x")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budget = 0.1 if args.quick else 0.5
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.rows:
        costs = batch_costs(["native", *([args.target] if args.target else [])], budget)
        if args.json:
            print(json.dumps(costs, indent=1))
        else:
            print_batch_costs(costs)
        return
    if args.target:
        result = target_rates(args.target, shapes, budget)
        print(json.dumps(result, indent=1) if args.json else "", end="")
        if not args.json:
            print_target_rates(result)
        return
    results = {label: one_shape(*shape, budget) for label, shape in shapes.items()}
    cross_shape = next(iter(shapes.values()))
    cross = crossover(*cross_shape, budget)
    if args.json:
        print(json.dumps({"threads": args.threads, "per_matvec_us": results,
                          "rows": {"shape": cross_shape, "us": cross}}, indent=1))
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), cpu {os.cpu_count()} cores, "
          f"int4 tiled layout native: {native_int4_tiled()}")
    names = list(next(iter(results.values())))
    print(f"\n| shape | {' | '.join(names)} |")
    print("|---" * (len(names) + 1) + "|")
    for label, row in results.items():
        cells = " | ".join(f"{row[n]:.0f}" + (f" ({row['f32'] / row[n]:.1f}x)"
                                                if n != "f32" else "") for n in names)
        print(f"| {label} | {cells} |")
    print("\nus per matvec (speed-up over f32). Weight bytes per parameter: f32 4, bf16 2, "
          "int8 1 (+2/row; the blocks a split stores: +4 per 32), int4 0.5 (+4 per group of 32).")
    print(f"\nrows per call on {cross_shape[0]}x{cross_shape[1]} (us): kernel vs dequantize + "
          "bf16 matmul")
    print("| rows | int8 kernel | int8 gemm | int4 kernel | int4 gemm |\n|---|---|---|---|---|")
    for rows, row in cross.items():
        print(f"| {rows} | {row['int8 kernel']:.0f} | {row['int8 gemm']:.0f} | "
              f"{row['int4 kernel']:.0f} | {row['int4 gemm']:.0f} |")


if __name__ == "__main__":
    main()
