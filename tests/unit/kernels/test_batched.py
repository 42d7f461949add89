"""The batched decode products (csrc/matvec.c's ``et_matvec_*_rows`` through
edgetp.kernels.native): up to MAX_BATCH_ROWS rows of x at once, every row bitwise what the
one-row product of that row alone gives (what makes a continuously batched sequence decode the
same greedy tokens as alone), close to the dequantized float product, on the native build and
on the AVX2 one (``x86-64-v3``), on one thread and split over the pool."""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from edgetp.kernels import native as kernels
from edgetp.parallel.qlinear import QuantColumnParallelLinear, int4_product, int8_product
from edgetp.shard.quant import (
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    quantize_int8_blocks,
)

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="no C compiler: the torch path is all there is")

TARGETS = ["native", "x86-64-v3"] if platform.machine() in kernels.X86 else ["native"]
# (rows, cols): odd row counts (tails of every row block), columns a multiple of each format's
# need (32 for the int8 blocks and int4 groups), and shapes read in several cache chunks
DENSE_SHAPES = [(1, 1), (7, 37), (97, 160), (301, 1000), (1003, 384)]
# the blocks: cols % 32; 1376: AVX-512 takes two rounds of 512 columns, 256, 64, then 32
INT8_SHAPES = [(1, 64), (7, 96), (130, 224), (301, 1024), (1003, 384), (37, 1376)]
INT4_SHAPES = [(16, 64), (80, 128), (208, 256), (1040, 384)]  # rows % 16, cols % 32

Product = Callable[[torch.Tensor], torch.Tensor | None]


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The kernels built for this target stand in for the runtime's own."""
    if request.param != "native":
        lib = kernels.library_for(request.param)
        if lib is None:
            pytest.skip(f"no {request.param} build here")
        monkeypatch.setattr(kernels, "library", lambda: lib)
    yield request.param
    kernels.set_threads(1)  # as the test session runs torch: one thread


def check_rows(product: Product, x: torch.Tensor, exact: torch.Tensor, tolerance: float) -> None:
    """For every T in 1..MAX_BATCH_ROWS: ``product(x[:T])`` row t bitwise ``product(x[t])``,
    and within ``tolerance`` (relative to the largest) of ``exact`` [T, out]."""
    alone = [product(x[t:t + 1].contiguous()) for t in range(len(x))]
    for batch in range(1, kernels.MAX_BATCH_ROWS + 1):
        y = product(x[:batch].contiguous())  # [T, out]
        assert y is not None and y.shape == (batch, exact.shape[1])
        for t in range(batch):
            assert torch.equal(y[t:t + 1], alone[t]), f"row {t} of {batch} differs from alone"
    got = torch.cat(alone).double()  # type: ignore[arg-type]
    error = (got - exact).abs().max() / exact.abs().max().clamp(min=1e-30)
    assert float(error) < tolerance


def rows_of_x(cols: int, seed: int) -> torch.Tensor:
    return torch.randn(kernels.MAX_BATCH_ROWS, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("rows", "cols"), DENSE_SHAPES)
def test_float32_rows_are_their_one_row_products(target: str, rows: int, cols: int) -> None:
    w, x = torch.randn(rows, cols), rows_of_x(cols, rows)
    check_rows(lambda x: kernels.linear(x, w), x, x.double() @ w.double().T, 1e-5)


@pytest.mark.parametrize(("rows", "cols"), DENSE_SHAPES)
def test_bfloat16_rows_are_their_one_row_products(target: str, rows: int, cols: int) -> None:
    w, x = torch.randn(rows, cols).bfloat16(), rows_of_x(cols, rows).bfloat16()
    exact = x.double() @ w.double().T
    check_rows(lambda x: kernels.linear(x, w), x, exact, 1e-2)  # output rounded to bfloat16
    check_rows(lambda x: kernels.float_linear(x, w), x, exact, 1e-5)  # the logits' sums


@pytest.mark.parametrize(("rows", "cols"), INT8_SHAPES)
def test_int8_rows_are_their_one_row_products(target: str, rows: int, cols: int) -> None:
    w, x = torch.randn(rows, cols) / cols**0.5, rows_of_x(cols, rows)
    q, scale = quantize_int8(w)
    exact = x.double() @ dequantize_int8(q, scale, torch.float64).T
    check_rows(lambda x: kernels.int8_linear(x, q, scale), x, exact, 1e-3)


@pytest.mark.parametrize(("rows", "cols"), INT8_SHAPES)
def test_block_int8_rows_are_their_one_row_products(target: str, rows: int, cols: int) -> None:
    """Both block formats: a scale per 32 columns, and a scale and a low end (a split's)."""
    w, x = torch.randn(rows, cols) / cols**0.5, rows_of_x(cols, rows)
    q, scale_low = quantize_int8_blocks(w)
    exact = x.double() @ dequantize_int8(q, scale_low, torch.float64).T
    check_rows(lambda x: kernels.int8_linear(x, q, scale_low), x, exact, 1e-3)
    symmetric = x.double() @ (q.double() * scale_low[0].double().repeat_interleave(32, 1)).T
    check_rows(lambda x: kernels.int8_linear(x, q, scale_low[0]), x, symmetric, 1e-3)


@pytest.mark.parametrize(("rows", "cols"), INT4_SHAPES)
@pytest.mark.parametrize("pairs", [torch.bfloat16, torch.float32])
def test_int4_rows_are_their_one_row_products(target: str, rows: int, cols: int,
                                              pairs: torch.dtype) -> None:
    w, x = torch.randn(rows, cols) / cols**0.5, rows_of_x(cols, rows)
    packed, scale_zero = quantize_int4(w, 32)
    scale_zero = scale_zero.to(pairs)
    exact = x.double() @ dequantize_int4(packed, scale_zero, torch.float64).T
    check_rows(lambda x: kernels.int4_linear(x, packed, scale_zero, 32), x, exact, 1e-3)


def test_rows_split_over_the_pool_are_the_same_bits(target: str) -> None:
    """Two threads (the weight shared out in 48- and 64-row chunks) give the one-thread bits."""
    w, x = torch.randn(1040, 1024) / 32, rows_of_x(1024, 5)
    q, scale = quantize_int8(w)
    packed, scale_zero = quantize_int4(w, 32)
    products: list[Product] = [lambda x: kernels.linear(x, w),
                               lambda x: kernels.int8_linear(x, q, scale),
                               lambda x: kernels.int4_linear(x, packed, scale_zero, 32)]
    kernels.set_threads(1)
    one_thread = [product(x) for product in products]
    kernels.set_threads(2)
    jobs = kernels.pool_jobs()
    for product, want in zip(products, one_thread, strict=True):
        assert torch.equal(product(x), want)  # type: ignore[arg-type]
    assert kernels.threads() == 1 or kernels.pool_jobs() > jobs


def test_other_batch_sizes_are_refused_by_the_c_products() -> None:
    lib = kernels.library()
    assert lib is not None
    w, x, y = torch.randn(4, 8), torch.randn(9, 8), torch.empty(9, 4)
    for nx in (0, kernels.MAX_BATCH_ROWS + 1):
        assert lib.et_matvec_f32_rows(w.data_ptr(), x.data_ptr(), y.data_ptr(), 4, 8, nx) == -3
        assert lib.et_par_matvec_f32_rows(w.data_ptr(), x.data_ptr(), y.data_ptr(), 4, 8,
                                          ctypes.c_int64(nx)) == -3


def test_an_inf_in_one_row_makes_only_that_row_nan() -> None:
    w = torch.randn(80, 128) / 10
    q, scale = quantize_int8(w)
    packed, scale_zero = quantize_int4(w, 32)
    x = torch.randn(3, 128)
    x[1, 7] = float("inf")
    for y in (kernels.int8_linear(x, q, scale), kernels.int4_linear(x, packed, scale_zero, 32)):
        assert y is not None
        assert bool(torch.isnan(y[1]).all()) and not bool(torch.isnan(y[[0, 2]]).any())


def test_quantized_linears_batch_their_decode_rows() -> None:
    """int8_product, int4_product and a head's float_matmul: 2..8 rows through the batched
    kernels, each row bitwise the one-row product."""
    w, x = torch.randn(96, 256) / 16, rows_of_x(256, 3)
    q, scale = quantize_int8(w)
    packed, scale_zero = quantize_int4(w, 32)
    head = QuantColumnParallelLinear("int8", tuple(q.shape), tuple(scale.shape), bias=False)
    head.weight = nn.Parameter(q, requires_grad=False)
    head.weight_scale = nn.Parameter(scale, requires_grad=False)
    head.float_output = True
    products: list[Product] = [
        lambda x: int8_product(x, q, scale),
        lambda x: int4_product(x, packed, scale_zero, 32, kernel_layout=True),
        lambda x: head.matmul(x),
    ]
    for product in products:
        y = product(x)
        assert y is not None
        for t in range(len(x)):
            assert torch.equal(y[t:t + 1], product(x[t:t + 1]))


def test_a_batch_goes_into_the_buffer_it_is_given() -> None:
    x, w = rows_of_x(32, 1)[:3], torch.randn(24, 32)
    buffer = torch.empty(3, 24)
    assert kernels.linear(x, w, buffer).data_ptr() == buffer.data_ptr()
    assert kernels.linear(x, w, torch.empty(1, 24)).shape == (3, 24)
