"""The kernel harness's table of kernels and the reference cases it checks them against.

:data:`KERNELS` is the one place that names the kernels: one line per exported ``et_matvec_*``
function of ``edgetp/kernels/csrc/matvec.c`` (its C call shape, its word in
``et_kernel_paths()`` and the function writing its cases). :func:`exported_kernels` reads the
source, and :func:`write_cases` refuses to run when an exported product has no line here.

Each case is the inputs, the status the kernel must return, and per output element the value
computed here in float64 from the same inputs (x quantized to int16 per 64 columns exactly as
the C code does, for the integer products) with a tolerance from the kernel's documented
guarantee: 0 for the "exact" cases, whose integer sums and power-of-two scales leave nothing to
round, else a bound on float32 rounding (``terms * 2^-24 * sum of |products|``, plus one
bfloat16 rounding of the bfloat16 output).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgetp.kernels.native import SOURCE
from edgetp.shard.quant import int4_tiled, pack_int4

U32 = 2.0**-24  # float32 unit roundoff
U_BF16 = 2.0**-8
QBLOCK, QMAX = 64, 32767.0
MAGIC = b"ETKCASE1"
NAME_BYTES = 64
OUT_F32, OUT_BF16 = 0, 1
NOT_BUILT = -3  # the status of a product this build leaves to torch (or a shape it refuses)


@dataclass
class Case:
    """One call: ``inputs`` in argument order, the output's size and kind, the integer args."""

    label: str
    inputs: list[np.ndarray]
    ints: list[int]
    n_out: int
    expected: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64 [n_out]
    tolerance: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64 [n_out]
    status: int = 0
    out_kind: int = OUT_F32


@dataclass(frozen=True)
class Kernel:
    """An exported product: its C call shape (harness.c's KIND_*), its path word, its cases."""

    kind: str
    product: str
    cases: Callable[[np.random.Generator], Iterator[Case]]


def bf16(values: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bits (uint16), rounded to nearest even as torch does."""
    return torch.from_numpy(np.ascontiguousarray(values, np.float32)).bfloat16().view(
        torch.int16).numpy().view(np.uint16)


def bf16_value(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def float32_bound(terms: float, magnitude: np.ndarray) -> np.ndarray:
    """Worst-case float32 rounding of a sum of ``terms`` terms of total size ``magnitude``."""
    return terms * U32 * magnitude * 1.01


# ---- float32 and bfloat16 ------------------------------------------------------------------

DENSE_SHAPES = [(1, 1), (3, 7), (4, 16), (5, 33), (8, 32), (9, 65), (12, 64), (13, 100),
                (17, 257), (25, 31), (33, 1000),
                (7, 4127), (6, 8256)]  # x over 16 KiB: float32 rows go several to a pass


def f32_cases(rng: np.random.Generator) -> Iterator[Case]:
    for rows, cols in DENSE_SHAPES:
        w = rng.standard_normal((rows, cols), dtype=np.float32)  # [rows, cols]
        x = rng.standard_normal(cols, dtype=np.float32)  # [cols]
        exact = w.astype(np.float64) @ x
        size = np.abs(w.astype(np.float64)) @ np.abs(x)
        yield Case(f"{rows}x{cols}", [w, x], [rows, cols], rows, exact,
                   float32_bound(cols, size))
    w = rng.integers(-8, 9, (13, 77)).astype(np.float32)  # small integers: every sum exact
    x = rng.integers(-8, 9, 77).astype(np.float32)
    yield Case("13x77 exact", [w, x], [13, 77], 13, w.astype(np.float64) @ x, np.zeros(13))


def bf16_cases(f32_out: bool) -> Callable[[np.random.Generator], Iterator[Case]]:
    """bfloat16 products: y rounded to bfloat16 (``et_matvec_bf16``) or the float32 sums
    (``et_matvec_bf16_f32``, the logits' product)."""
    def rounded(exact: np.ndarray, accumulated: np.ndarray) -> np.ndarray:
        return accumulated if f32_out else accumulated + U_BF16 * (np.abs(exact) + accumulated)

    out_kind = OUT_F32 if f32_out else OUT_BF16

    def cases(rng: np.random.Generator) -> Iterator[Case]:
        for rows, cols in DENSE_SHAPES:
            w = bf16(rng.standard_normal((rows, cols)))  # [rows, cols] bfloat16 bits
            x = bf16(rng.standard_normal(cols))  # [cols]
            exact = bf16_value(w) @ bf16_value(x)
            accumulated = float32_bound(cols, np.abs(bf16_value(w)) @ np.abs(bf16_value(x)))
            yield Case(f"{rows}x{cols}", [w, x], [rows, cols], rows, exact,
                       rounded(exact, accumulated), out_kind=out_kind)
        w = bf16(rng.integers(-1, 2, (9, 64)))  # |sum| <= 256: exact in bfloat16
        x = bf16(rng.integers(-4, 5, 64))
        yield Case("9x64 exact", [w, x], [9, 64], 9, bf16_value(w) @ bf16_value(x), np.zeros(9),
                   out_kind=out_kind)
    return cases


# ---- int8 and int4: x quantized to int16 per 64 columns, as the C code does ------------------

def quantized_x(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [cols] -> (codes int64 [cols], scale float64 [cols], each column its block's),
    with the C code's arithmetic (double division, round half to even)."""
    codes, scales = np.zeros(len(x), np.int64), np.zeros(len(x))
    for start in range(0, len(x), QBLOCK):
        block = x[start:start + QBLOCK].astype(np.float64)
        peak = float(np.max(np.abs(block)))
        inverse = QMAX / peak if peak > 0 else 0.0
        codes[start:start + QBLOCK] = np.rint(block * inverse).astype(np.int64)
        scales[start:start + QBLOCK] = float(np.float32(peak / QMAX))
    return codes, scales


def exact_x(rng: np.random.Generator, cols: int, shift: int = 10) -> np.ndarray:
    """x whose quantization loses nothing: small integers times 2^-shift, each block's peak
    32767 * 2^-shift (so its scale is 2^-shift and its codes are the integers)."""
    codes = rng.integers(-20, 21, cols)
    codes[::QBLOCK] = QMAX
    return (codes * 2.0**-shift).astype(np.float32)


def int8_row_reference(w: np.ndarray, x: np.ndarray, scale: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(expected, tolerance) of y = (w [rows, cols] . x) * scale, scale float64 per element of
    w (the row's, or the 32-column block's)."""
    codes, block_scale = quantized_x(x)
    terms = w.astype(np.int64) * codes * block_scale * scale  # [rows, cols]
    blocks = -(-w.shape[1] // QBLOCK)
    return terms.sum(axis=1), float32_bound(2 * blocks + 24, np.abs(terms).sum(axis=1))


def i8_cases(rng: np.random.Generator) -> Iterator[Case]:
    for rows, cols in [(1, 1), (3, 63), (4, 64), (7, 65), (5, 128), (17, 200), (2, 513)]:
        w = rng.integers(-127, 128, (rows, cols), dtype=np.int8)  # [rows, cols]
        scale = bf16(rng.uniform(0.001, 0.1, rows))  # [rows]
        x = rng.standard_normal(cols, dtype=np.float32)
        expected, tolerance = int8_row_reference(w, x, bf16_value(scale)[:, None])
        yield Case(f"{rows}x{cols}", [w, scale, x], [rows, cols], rows, expected, tolerance)
    w = rng.integers(-1, 2, (6, 150), dtype=np.int8)
    scale, x = bf16(np.full(6, 0.25)), exact_x(rng, 150)
    expected, _ = int8_row_reference(w, x, 0.25)
    yield Case("6x150 exact", [w, scale, x], [6, 150], 6, expected, np.zeros(6))
    yield nan_case(rng, [w, scale], 6, 150)


def nan_case(rng: np.random.Generator, weights: list[np.ndarray], rows: int, cols: int) -> Case:
    """An infinite x: every output NaN (the kernels' documented answer)."""
    x = rng.standard_normal(cols, dtype=np.float32)
    x[cols // 2] = np.inf
    return Case(f"{rows}x{cols} inf in x", [*weights, x], [rows, cols], rows,
                np.full(rows, np.nan), np.zeros(rows))


def f16_bits(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, np.float16).view(np.uint16)


def i8_b32_cases(rng: np.random.Generator) -> Iterator[Case]:
    for rows, cols in [(1, 32), (3, 64), (5, 96), (7, 160), (2, 544), (4, 256), (3, 1376)]:
        w = rng.integers(-127, 128, (rows, cols), dtype=np.int8)  # [rows, cols]
        scale = f16_bits(rng.uniform(0.001, 0.1, (rows, cols // 32)))  # [rows, cols / 32]
        x = rng.standard_normal(cols, dtype=np.float32)
        per_column = np.repeat(scale.view(np.float16).astype(np.float64), 32, axis=1)
        expected, tolerance = int8_row_reference(w, x, per_column)
        yield Case(f"{rows}x{cols}", [w, scale, x], [rows, cols], rows, expected, tolerance)
    w = rng.integers(-1, 2, (4, 224), dtype=np.int8)
    scale, x = f16_bits(np.full((4, 7), 0.5)), exact_x(rng, 224)
    expected, _ = int8_row_reference(w, x, 0.5)
    yield Case("4x224 exact", [w, scale, x], [4, 224], 4, expected, np.zeros(4))
    yield nan_case(rng, [w, scale], 4, 224)
    bad = rng.integers(-1, 2, (2, 48), dtype=np.int8)
    yield Case("2x48 not whole blocks", [bad, f16_bits(np.ones((2, 2))),
                                         np.ones(48, np.float32)], [2, 48], 2, status=NOT_BUILT)


def int4_reference(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, x: np.ndarray,
                   group: int) -> tuple[np.ndarray, np.ndarray]:
    """(expected, tolerance) of the tiled int4 product: per row and group,
    scale * sum q x_quantized + (zero - 8 scale) * sum x (scale, zero [groups, rows])."""
    rows, cols = codes.shape
    xq, block_scale = quantized_x(x)
    per_column = np.repeat(scale.T, group, axis=1)  # [rows, cols]
    offset = np.repeat((zero - 8 * scale).T, group, axis=1)  # [rows, cols]
    coded = codes.astype(np.int64) * xq * block_scale * per_column
    shifted = offset * x.astype(np.float64)
    units = cols // min(group, QBLOCK)
    size = (float32_bound(units + 24, np.abs(coded).sum(axis=1))
            + float32_bound(group + 24, np.abs(shifted).sum(axis=1)))
    return (coded + shifted).sum(axis=1), size


def int4_case(label: str, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray,
              x: np.ndarray, group: int, f32_pairs: bool, exact: bool = False) -> Case:
    rows, cols = codes.shape
    pairs = np.stack([scale, zero], axis=-1)  # [groups, rows, 2]
    pairs_in = pairs.astype(np.float32) if f32_pairs else bf16(pairs)
    pair_values = pairs_in.astype(np.float64) if f32_pairs else bf16_value(pairs_in)
    expected, tolerance = int4_reference(codes, pair_values[..., 0], pair_values[..., 1], x, group)
    packed = pack_int4(torch.from_numpy(codes), int4_tiled(rows, group)).numpy()
    return Case(label, [packed, pairs_in, x], [rows, cols, group], rows, expected,
                np.zeros(rows) if exact else tolerance)


def int4_cases(f32_pairs: bool) -> Callable[[np.random.Generator], Iterator[Case]]:
    def cases(rng: np.random.Generator) -> Iterator[Case]:
        for rows, cols, group in [(16, 64, 32), (48, 96, 32), (64, 128, 64), (80, 256, 128),
                                  (160, 192, 64), (32, 512, 256)]:
            codes = rng.integers(0, 16, (rows, cols), dtype=np.uint8)  # [rows, cols]
            scale = rng.uniform(0.001, 0.05, (cols // group, rows))  # [groups, rows]
            zero = rng.uniform(-0.1, 0.1, (cols // group, rows))
            x = rng.standard_normal(cols, dtype=np.float32)
            yield int4_case(f"{rows}x{cols} group {group}", codes, scale, zero, x, group,
                            f32_pairs)
        codes = rng.integers(0, 16, (112, 256), dtype=np.uint8)
        scale = np.full((4, 112), 2.0**-4)  # powers of two, code 0 worth 0.125: all exact
        yield int4_case("112x256 exact", codes, scale, 8 * scale + 0.125, exact_x(rng, 256), 64,
                        f32_pairs, exact=True)
        for rows, cols, group in [(24, 64, 32), (16, 64, 16)]:  # rows or group it refuses
            bad = rng.integers(0, 16, (rows, cols), dtype=np.uint8)
            case = int4_case(f"{rows}x{cols} group {group} refused", bad,
                             np.ones((cols // group, rows)), np.zeros((cols // group, rows)),
                             np.ones(cols, np.float32), group, f32_pairs)
            case.status = NOT_BUILT
            yield case
    return cases


# ---- the batched products: x [nx, cols] -> y [nx, rows] -------------------------------------
#
# Each row checked against its reference here, and by harness.c bitwise against the one-row
# product of that x row alone (the kernel's name without "_rows").

MAX_BATCH = 8
# shapes big enough to be read in several cache-sized chunks (csrc's BATCH_CHUNK_BYTES, 64 KiB)
BATCH_DENSE_SHAPES = [*DENSE_SHAPES, (301, 1000), (97, 4100)]
Reference = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # x row -> (expected, tol)


def batch_case(label: str, weights: list[np.ndarray], x: np.ndarray, reference: Reference,
               ints: list[int], rows: int, out_kind: int = OUT_F32) -> Case:
    """One batched call: ``x`` [nx, cols] after ``weights``; nx appended to ``ints``."""
    parts = [reference(row) for row in x]
    expected = np.concatenate([part[0] for part in parts])
    tolerance = np.concatenate([part[1] for part in parts])
    return Case(f"{label} x{len(x)}", [*weights, x], [*ints, len(x)], rows * len(x), expected,
                tolerance, out_kind=out_kind)


def refused_batches(label: str, weights: list[np.ndarray], cols: int, ints: list[int],
                    rows: int, out_kind: int = OUT_F32) -> Iterator[Case]:
    """nx 0 and MAX_BATCH + 1: refused (status -3)."""
    for nx in (0, MAX_BATCH + 1):
        x = np.ones((max(nx, 1), cols), np.float32)
        yield Case(f"{label} x{nx} refused", [*weights, x], [*ints, nx], rows * max(nx, 1),
                   status=NOT_BUILT, out_kind=out_kind)


def f32_rows_cases(rng: np.random.Generator) -> Iterator[Case]:
    for nx, (rows, cols) in enumerate(BATCH_DENSE_SHAPES):
        w = rng.standard_normal((rows, cols), dtype=np.float32)  # [rows, cols]
        x = rng.standard_normal((nx % MAX_BATCH + 1, cols), dtype=np.float32)  # [nx, cols]
        w64 = w.astype(np.float64)

        def reference(row: np.ndarray, w64: np.ndarray = w64) -> tuple[np.ndarray, np.ndarray]:
            return w64 @ row, float32_bound(w64.shape[1], np.abs(w64) @ np.abs(row))
        yield batch_case(f"{rows}x{cols}", [w], x, reference, [rows, cols], rows)
    yield from refused_batches("3x7", [np.ones((3, 7), np.float32)], 7, [3, 7], 3)


def bf16_rows_cases(f32_out: bool) -> Callable[[np.random.Generator], Iterator[Case]]:
    out_kind = OUT_F32 if f32_out else OUT_BF16

    def cases(rng: np.random.Generator) -> Iterator[Case]:
        for nx, (rows, cols) in enumerate(BATCH_DENSE_SHAPES):
            w = bf16(rng.standard_normal((rows, cols)))  # [rows, cols] bfloat16 bits
            x = bf16(rng.standard_normal((nx % MAX_BATCH + 1, cols)))  # [nx, cols]
            wv = bf16_value(w)

            def reference(row: np.ndarray, wv: np.ndarray = wv) -> tuple[np.ndarray, np.ndarray]:
                exact = wv @ bf16_value(row)
                bound = float32_bound(wv.shape[1], np.abs(wv) @ np.abs(bf16_value(row)))
                return exact, bound if f32_out else bound + U_BF16 * (np.abs(exact) + bound)
            yield batch_case(f"{rows}x{cols}", [w], x, reference, [rows, cols], rows, out_kind)
        yield from refused_batches("3x7", [bf16(np.ones((3, 7)))], 7, [3, 7], 3, out_kind)
    return cases


def with_inf_row(x: np.ndarray) -> np.ndarray:
    """x [nx, cols] with an inf in its second row (when it has one): that row's outputs NaN."""
    if len(x) > 1:
        x[1, x.shape[1] // 2] = np.inf
    return x


def quantized_reference(reference: Reference) -> Reference:
    def checked(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not np.isfinite(row).all():
            n = len(reference(np.zeros_like(row))[0])
            return np.full(n, np.nan), np.zeros(n)
        return reference(row)
    return checked


def i8_rows_cases(rng: np.random.Generator) -> Iterator[Case]:
    shapes = [(1, 1), (3, 63), (4, 64), (7, 65), (5, 128), (17, 200), (2, 513), (9, 64),
              (301, 1000)]
    for nx, (rows, cols) in enumerate(shapes):
        w = rng.integers(-127, 128, (rows, cols), dtype=np.int8)  # [rows, cols]
        scale = bf16(rng.uniform(0.001, 0.1, rows))  # [rows]
        x = rng.standard_normal((nx % MAX_BATCH + 1, cols), dtype=np.float32)
        if nx % 3 == 2:
            x = with_inf_row(x)
        per_row = bf16_value(scale)[:, None]
        reference = quantized_reference(
            lambda row, w=w, per_row=per_row: int8_row_reference(w, row, per_row))
        yield batch_case(f"{rows}x{cols}", [w, scale], x, reference, [rows, cols], rows)
    yield from refused_batches("3x64", [np.ones((3, 64), np.int8), bf16(np.ones(3))], 64,
                               [3, 64], 3)


def i8_b32_rows_cases(rng: np.random.Generator) -> Iterator[Case]:
    shapes = [(1, 32), (3, 64), (5, 96), (7, 160), (2, 544), (13, 224), (4, 32), (6, 64),
              (301, 1024), (9, 1376)]
    for nx, (rows, cols) in enumerate(shapes):
        w = rng.integers(-127, 128, (rows, cols), dtype=np.int8)  # [rows, cols]
        scale = f16_bits(rng.uniform(0.001, 0.1, (rows, cols // 32)))  # [rows, cols / 32]
        x = rng.standard_normal((nx % MAX_BATCH + 1, cols), dtype=np.float32)
        if nx % 3 == 2:
            x = with_inf_row(x)
        per_column = np.repeat(scale.view(np.float16).astype(np.float64), 32, axis=1)
        reference = quantized_reference(
            lambda row, w=w, per_column=per_column: int8_row_reference(w, row, per_column))
        yield batch_case(f"{rows}x{cols}", [w, scale], x, reference, [rows, cols], rows)
    ones = [np.ones((2, 64), np.int8), f16_bits(np.ones((2, 2)))]
    yield from refused_batches("2x64", ones, 64, [2, 64], 2)
    yield Case("2x48 not whole blocks x2", [np.ones((2, 48), np.int8), f16_bits(np.ones((2, 2))),
                                            np.ones((2, 48), np.float32)], [2, 48, 2], 4,
               status=NOT_BUILT)


def i4_rows_cases(f32_pairs: bool) -> Callable[[np.random.Generator], Iterator[Case]]:
    def cases(rng: np.random.Generator) -> Iterator[Case]:
        shapes = [(16, 64, 32), (48, 96, 32), (64, 128, 64), (80, 256, 128), (160, 192, 64),
                  (32, 512, 256), (112, 64, 32), (208, 128, 32)]
        for nx, (rows, cols, group) in enumerate(shapes):
            codes = rng.integers(0, 16, (rows, cols), dtype=np.uint8)  # [rows, cols]
            scale = rng.uniform(0.001, 0.05, (cols // group, rows))  # [groups, rows]
            zero = rng.uniform(-0.1, 0.1, (cols // group, rows))
            x = rng.standard_normal((nx % MAX_BATCH + 1, cols), dtype=np.float32)
            if nx % 3 == 2:
                x = with_inf_row(x)
            one = int4_case("", codes, scale, zero, x[0], group, f32_pairs)
            packed, pairs_in = one.inputs[0], one.inputs[1]
            values = pairs_in.astype(np.float64) if f32_pairs else bf16_value(pairs_in)
            reference = quantized_reference(
                lambda row, codes=codes, values=values, group=group: int4_reference(
                    codes, values[..., 0], values[..., 1], row, group))
            yield batch_case(f"{rows}x{cols} group {group}", [packed, pairs_in], x, reference,
                             [rows, cols, group], rows)
        packed = pack_int4(torch.zeros(16, 64, dtype=torch.uint8), int4_tiled(16, 32)).numpy()
        pairs = np.ones((2, 16, 2), np.float32) if f32_pairs else bf16(np.ones((2, 16, 2)))
        yield from refused_batches("16x64", [packed, pairs], 64, [16, 64, 32], 16)
    return cases


KERNELS: dict[str, Kernel] = {
    "et_matvec_f32": Kernel("WXY_VOID", "f32", f32_cases),
    "et_matvec_bf16": Kernel("WXY", "bf16", bf16_cases(f32_out=False)),
    "et_matvec_bf16_f32": Kernel("WXY", "bf16", bf16_cases(f32_out=True)),
    "et_matvec_i8": Kernel("WSXY", "i8", i8_cases),
    "et_matvec_i8_b32": Kernel("WSXY", "i8_b32", i8_b32_cases),
    "et_matvec_i4": Kernel("WSXY_GROUP", "i4", int4_cases(f32_pairs=False)),
    "et_matvec_i4_f32": Kernel("WSXY_GROUP", "i4", int4_cases(f32_pairs=True)),
    "et_matvec_f32_rows": Kernel("WXY_N", "f32", f32_rows_cases),
    "et_matvec_bf16_rows": Kernel("WXY_N", "bf16", bf16_rows_cases(f32_out=False)),
    "et_matvec_bf16_f32_rows": Kernel("WXY_N", "bf16", bf16_rows_cases(f32_out=True)),
    "et_matvec_i8_rows": Kernel("WSXY_N", "i8", i8_rows_cases),
    "et_matvec_i8_b32_rows": Kernel("WSXY_N", "i8_b32", i8_b32_rows_cases),
    "et_matvec_i4_rows": Kernel("WSXY_GROUP_N", "i4", i4_rows_cases(f32_pairs=False)),
    "et_matvec_i4_f32_rows": Kernel("WSXY_GROUP_N", "i4", i4_rows_cases(f32_pairs=True)),
}

EXPORT = re.compile(r"^(?:int|void)\s+(et_matvec_\w+)\s*\(", re.MULTILINE)


def exported_kernels(source: Path = SOURCE) -> list[str]:
    """Every ``et_matvec_*`` function the kernel source defines (those of every #if branch)."""
    return sorted(set(EXPORT.findall(source.read_text())))


def check_table(source: Path = SOURCE) -> None:
    missing = [name for name in exported_kernels(source) if name not in KERNELS]
    if missing:
        raise SystemExit(f"{source} exports {', '.join(missing)} without a line in "
                         "tests/kernels/kernel_cases.py's KERNELS: add one (kind, path word, "
                         "cases) so the harness tests it")


def table_header() -> str:
    """The C table harness.c includes: one ``KERNEL(name, kind, "path word")`` per kernel."""
    lines = [f'KERNEL({name}, {k.kind}, "{k.product}")' for name, k in KERNELS.items()]
    return "/* written by tests/kernels/kernel_cases.py */\n" + "\n".join(lines) + "\n"


def write_case(path: Path, kernel: str, case: Case) -> None:
    """The binary case format harness.c reads (little-endian, see read_case there)."""
    def name(text: str) -> bytes:
        return text.encode()[:NAME_BYTES - 1].ljust(NAME_BYTES, b"\0")

    expected = case.expected if case.status == 0 else np.zeros(case.n_out)
    tolerance = case.tolerance if case.status == 0 else np.zeros(case.n_out)
    with path.open("wb") as out:
        out.write(MAGIC + name(kernel) + name(case.label))
        out.write(struct.pack("<5q", len(case.inputs), len(case.ints), case.status,
                              case.out_kind, case.n_out))
        out.write(struct.pack(f"<{len(case.ints)}q", *case.ints))
        for array in case.inputs:
            data = np.ascontiguousarray(array).tobytes()
            out.write(struct.pack("<q", len(data)) + data)
        out.write(np.asarray(expected, "<f8").tobytes() + np.asarray(tolerance, "<f8").tobytes())


def write_cases(directory: Path, source: Path = SOURCE, seed: int = 23) -> int:
    """Every kernel's cases into ``directory`` (plus ``kernel_table.h``); returns the count."""
    check_table(source)
    rng = np.random.default_rng(seed)
    (directory / "kernel_table.h").write_text(table_header())
    count = 0
    for kernel_name, kernel in KERNELS.items():
        for case in kernel.cases(rng):
            write_case(directory / f"{count:03d}.case", kernel_name, case)
            count += 1
    return count
