"""The native decode kernels (edgetp/kernels/csrc/matvec.c through edgetp.kernels.native): the
same products as torch, their fallbacks, their buffers, and their place in the tensor-parallel
model (building and switching them off, in fresh processes: tests/integration/test_kernel_build.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edgetp.config.model import ModelConfig
from edgetp.kernels import native as kernels
from edgetp.model.llama import LogitsHead, Transformer
from edgetp.parallel.comm import SoloCommunicator
from edgetp.parallel.linears import ColumnParallelLinear, RowParallelLinear, shard_model
from edgetp.parallel.qlinear import QuantColumnParallelLinear
from edgetp.shard.plan import make_plan
from edgetp.shard.quant import (
    dequantize_int4,
    dequantize_int8,
    int4_tiled,
    quantize_int4,
    quantize_int8,
    quantize_int8_blocks,
)

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="no C compiler: the torch path is all there is")

# tails of rows and cols; the last two: x over 16 KiB in float32, and in bfloat16 too (rows
# several to a pass)
SHAPES = [(1, 1), (3, 16), (7, 37), (96, 160), (130, 64), (64, 1000), (11, 4200), (5, 8230)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    error = (got.double() - want.double()).abs().max()
    return float(error / want.double().abs().max().clamp(min=1e-30))


@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_float32_matches_torch(rows: int, cols: int) -> None:
    x, w = torch.randn(1, cols), torch.randn(rows, cols)
    assert relative_error(kernels.linear(x, w), x.double() @ w.double().T) < 1e-6


@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_bfloat16_matches_torch(rows: int, cols: int) -> None:
    x, w = torch.randn(1, cols).bfloat16(), torch.randn(rows, cols).bfloat16()
    got, want = kernels.linear(x, w), F.linear(x, w)
    assert got.dtype == torch.bfloat16
    # both sum in float32 and round once to bfloat16: at most one bfloat16 step apart
    assert torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize(("out_features", "cols"), [(5000, 64), (37, 100)])
def test_bfloat16_logits_keep_the_float32_sums(rows: int, out_features: int, cols: int) -> None:
    """float_linear (the head's product): bfloat16 products, float32 sums never rounded."""
    x = torch.randn(rows, cols).bfloat16()
    w = torch.randn(out_features, cols).bfloat16()
    got, want = kernels.float_linear(x, w), x.double() @ w.double().T  # products exact
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    assert relative_error(got, want) < 1e-6
    assert not torch.equal(got, got.bfloat16().float())  # not on the bfloat16 grid
    w32 = w.float()
    assert torch.equal(kernels.float_linear(x.float(), w32), kernels.linear(x.float(), w32))


@pytest.mark.parametrize(("rows", "cols"), SHAPES)
def test_int8_is_within_the_int16_activation_rounding(rows: int, cols: int) -> None:
    w = torch.randn(rows, cols) / 10
    q, scale = quantize_int8(w)
    x = torch.randn(1, cols)
    exact = x.double() @ dequantize_int8(q, scale).double().T  # [1, rows]
    got = kernels.int8_linear(x, q, scale)
    assert got is not None and got.shape == (1, rows) and got.dtype == torch.float32
    # x is rounded to 2^-16 of its block's peak, so each product errs at most that much
    bound = (x.abs().max() * 2.0 ** -16 * dequantize_int8(q, scale).abs().sum(1)).max()
    assert float((got.double() - exact).abs().max()) <= float(bound) * 1.01 + 1e-6
    bfloat16_activation = x.bfloat16().double() @ dequantize_int8(q, scale).double().T
    assert relative_error(got, exact) <= relative_error(bfloat16_activation, exact) + 1e-7


@pytest.mark.parametrize(("rows", "cols"), [(1, 32), (7, 96), (130, 64), (64, 1024)])
def test_int8_with_a_low_end_per_block_is_within_the_int16_activation_rounding(
        rows: int, cols: int) -> None:
    """The block format (a float16 scale and low end per 32 columns): the symmetric block
    kernel plus et_add_block_lows equal the dequantized product, off-centre blocks included."""
    w = torch.randn(rows, cols) / 10 + torch.randn(rows, cols // 32).repeat_interleave(32, 1)
    q, scale_low = quantize_int8_blocks(w)
    deq = dequantize_int8(q, scale_low).double()  # [rows, cols]
    x = torch.randn(1, cols)
    got = kernels.int8_linear(x, q, scale_low)
    assert got is not None and got.shape == (1, rows) and got.dtype == torch.float32
    exact = x.double() @ deq.T
    bound = (x.abs().max() * 2.0 ** -16 * deq.abs().sum(1)).max()  # x's int16 rounding
    assert float((got.double() - exact).abs().max()) <= float(bound) * 1.01 + 1e-5
    x[0, cols // 2] = float("nan")
    bad = kernels.int8_linear(x, q, scale_low)
    assert bad is not None and bool(torch.isnan(bad).all())


def test_int8_column_blocks_do_not_depend_on_the_split() -> None:
    """A row-parallel rank whose columns start at a multiple of 64 quantizes x as the whole row
    would, so the partial sums add up to the one-device product (to float32 rounding)."""
    w = torch.randn(48, 320) / 10
    q, scale = quantize_int8(w)
    x = torch.randn(1, 320) * torch.linspace(0.01, 30, 320)  # very unequal block peaks
    whole = kernels.int8_linear(x, q, scale)
    parts = [kernels.int8_linear(x[:, a:b].contiguous(), q[:, a:b].contiguous(), scale)
             for a, b in ((0, 128), (128, 192), (192, 320))]
    assert whole is not None and all(p is not None for p in parts)
    assert torch.allclose(sum(parts), whole, rtol=1e-5, atol=1e-5)  # type: ignore[arg-type]


def test_int8_propagates_nan_and_inf() -> None:
    q, scale = quantize_int8(torch.randn(5, 128))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(1, 128)
        x[0, 77] = bad
        got = kernels.int8_linear(x, q, scale)
        assert got is not None and bool(torch.isnan(got).all())


int4_only = pytest.mark.skipif(not kernels.has_int4(), reason="no C kernels here")


@int4_only
@pytest.mark.parametrize(("rows", "cols", "group"),
                         [(64, 64, 32), (128, 256, 64), (80, 128, 32), (112, 256, 128),
                          (48, 512, 256), (16, 32, 32), (208, 192, 32)])  # tails: 16, 48, 16
def test_int4_is_within_the_int16_activation_rounding(rows: int, cols: int, group: int) -> None:
    w = torch.randn(rows, cols) / 10
    packed, scale_zero = quantize_int4(w, group)
    assert int4_tiled(rows, group)
    x = torch.randn(1, cols)
    deq = dequantize_int4(packed, scale_zero).double()
    exact = x.double() @ deq.T  # [1, rows]
    got = kernels.int4_linear(x, packed, scale_zero, group)
    assert got is not None and got.shape == (1, rows) and got.dtype == torch.float32
    # x rounded to 2^-16 of its block's peak; the codes' part of each weight is at most
    # |w - zero| + 8 * scale <= |w| + 2 |zero| + 8 * scale, so bound by |deq| + 16 * scale
    scale = scale_zero[..., 0].float().T.repeat_interleave(group, dim=1)  # [rows, cols]
    bound = (x.abs().max() * 2.0**-16 * (deq.abs() + 2 * deq.abs().max() + 16 * scale).sum(1))
    assert float((got.double() - exact).abs().max()) <= float(bound.max()) + 1e-6
    assert relative_error(got, exact) < 1e-3


@int4_only
def test_int4_column_slices_add_up_to_the_whole_row() -> None:
    w = torch.randn(64, 384) / 10
    x = torch.randn(1, 384) * torch.linspace(0.01, 30, 384)
    packed, scale_zero = quantize_int4(w, 64)
    whole = kernels.int4_linear(x, packed, scale_zero, 64)
    parts = []
    for a, b in ((0, 128), (128, 192), (192, 384)):
        part_packed, part_sz = quantize_int4(w[:, a:b].contiguous(), 64)
        parts.append(kernels.int4_linear(x[:, a:b].contiguous(), part_packed, part_sz, 64))
    assert whole is not None and all(p is not None for p in parts)
    assert torch.allclose(sum(parts), whole, rtol=1e-5, atol=1e-4)  # type: ignore[arg-type]


@int4_only
def test_int4_takes_only_the_tiled_layout_and_propagates_nan() -> None:
    packed, scale_zero = quantize_int4(torch.randn(24, 64), 32)  # 24 rows: rows layout
    assert not int4_tiled(24, 32)
    assert kernels.int4_linear(torch.randn(1, 64), packed, scale_zero, 32) is None
    packed, scale_zero = quantize_int4(torch.randn(64, 64), 32)
    x = torch.randn(1, 64)
    x[0, 5] = float("nan")
    got = kernels.int4_linear(x, packed, scale_zero, 32)
    assert got is not None and bool(torch.isnan(got).all())


def test_other_products_go_to_torch() -> None:
    w = torch.randn(8, 16)
    too_many = torch.randn(kernels.MAX_BATCH_ROWS + 1, 16)  # a prefill chunk: torch's GEMM
    assert torch.equal(kernels.linear(too_many, w), F.linear(too_many, w))
    strided = torch.randn(16, 2)[:, :1].T  # [1, 16], not contiguous
    assert torch.allclose(kernels.linear(strided, w), F.linear(strided, w))
    mixed = torch.randn(1, 16).bfloat16()
    assert kernels.linear(mixed, w.bfloat16().float().bfloat16()).dtype == torch.bfloat16
    q, scale = quantize_int8(w)
    assert kernels.int8_linear(too_many, q, scale) is None
    assert kernels.int8_linear(torch.randn(1, 16).bfloat16(), q, scale) is None


def test_output_goes_into_the_buffer_it_is_given() -> None:
    x, w = torch.randn(1, 32), torch.randn(24, 32)
    buffer = torch.empty(1, 24)
    assert kernels.linear(x, w, buffer).data_ptr() == buffer.data_ptr()
    wrong = torch.empty(1, 23)
    assert kernels.linear(x, w, wrong).data_ptr() != wrong.data_ptr()


def tiny_config() -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=64, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, max_position_embeddings=64)


def test_layer_linears_reuse_their_output_and_the_head_does_not() -> None:
    torch.manual_seed(0)
    model = shard_model(Transformer(tiny_config()), make_plan(tiny_config(), 1), 0,
                        SoloCommunicator())
    attn = model.layers[0].self_attn
    assert isinstance(attn.q_proj, ColumnParallelLinear) and attn.q_proj.reuse_output
    assert isinstance(attn.o_proj, RowParallelLinear) and attn.o_proj.reuse_output
    assert isinstance(model.lm_head, LogitsHead)  # float32 logits, in a tensor of their own
    x = torch.randn(1, 128)
    first = attn.q_proj(x).data_ptr()
    assert attn.q_proj(torch.randn(1, 128)).data_ptr() == first  # the step's buffer, reused
    logits = model.lm_head(x)
    assert not torch.equal(model.lm_head(torch.randn(1, 128)), logits)  # kept logits survive
    prefill = attn.q_proj(torch.randn(3, 128))  # more than one row: torch, nothing kept
    assert prefill.shape == (3, 128) and attn.q_proj(x).data_ptr() == first


def test_int8_linear_decodes_natively_into_its_buffer() -> None:
    layer = QuantColumnParallelLinear("int8", (8, 64), (8,), False)
    q, scale = quantize_int8(torch.randn(8, 64))
    layer.weight = torch.nn.Parameter(q, requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
    layer.reuse_output = True  # as shard_model's layers (test_quant checks the inheritance)
    x = torch.randn(1, 64)
    y = layer(x)
    assert torch.equal(y, kernels.int8_linear(x, q, scale))  # type: ignore[arg-type]
    assert layer(torch.randn(1, 64)).data_ptr() == y.data_ptr()


@int4_only
def test_int4_linear_decodes_natively_into_its_buffer() -> None:
    packed, scale_zero = quantize_int4(torch.randn(64, 128), 32)
    layer = QuantColumnParallelLinear("int4", tuple(packed.shape), tuple(scale_zero.shape), False)
    layer.weight = torch.nn.Parameter(packed, requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(scale_zero, requires_grad=False)
    layer.reuse_output = True
    x = torch.randn(1, 128)
    y = layer(x)
    assert torch.equal(y, kernels.int4_linear(x, packed, scale_zero, 32))  # type: ignore[arg-type]
    assert layer(torch.randn(1, 128)).data_ptr() == y.data_ptr()
    assert torch.equal(layer.weight, packed)  # never repacked for torch's kernel


def test_the_cache_key_sees_the_cpu_features() -> None:
    identity = kernels._cpu_identity()
    if Path("/proc/cpuinfo").exists() and "flags" in Path("/proc/cpuinfo").read_text():
        assert any(line.startswith("flags") for line in identity.splitlines()), identity


def test_int8_keeps_subnormal_blocks() -> None:
    q, scale = quantize_int8(torch.randn(3, 64))
    x = torch.full((1, 64), 1e-38) * torch.linspace(-1, 1, 64)  # a block of subnormals
    got = kernels.int8_linear(x, q, scale)
    want = x.double() @ dequantize_int8(q, scale).double().T
    # the block scale is itself subnormal (a few bits short): close, and above all not 0
    assert got is not None and torch.allclose(got.double(), want, rtol=1e-2, atol=1e-44)


def test_a_float32_decode_step_allocates_nothing_in_the_layers() -> None:
    """After the first steps made their buffers, a one-token step through the layers of a
    rank's model allocates no tensor memory (torch's profiler sees every allocation)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    config = tiny_config()
    model = shard_model(Transformer(config), make_plan(config, 1), 0, SoloCommunicator())
    model.allocate_cache()
    with torch.inference_mode():
        model.forward_layers(model.embed(torch.tensor([1, 2, 3])), 0)  # prefill (allocates)
        for position in range(3, 6):
            h = model.embed(torch.tensor([position]))
            model.forward_layers(h, position)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = model.forward_layers(h, 6)
    allocations = [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage > 0]
    assert allocations == []
    assert out.shape == (1, config.hidden_size) and bool(torch.isfinite(out).all())


def test_a_model_run_in_inference_mode_still_runs_under_no_grad() -> None:
    """Kept step buffers are normal tensors: ones made in inference mode would refuse the
    in-place RoPE and MLP of a later step outside it."""
    torch.manual_seed(0)
    config = tiny_config()
    model = shard_model(Transformer(config), make_plan(config, 1), 0, SoloCommunicator())
    model.allocate_cache()
    with torch.inference_mode():
        first = model.forward_layers(model.embed(torch.tensor([1])), 0).clone()
    with torch.no_grad():
        again = model.forward_layers(model.embed(torch.tensor([1])), 0)
    assert torch.allclose(first, again)


# -- the variants that keep a GGUF's blocks (edgetp.shard.gguf_blocks) ----------------------------

BLOCK_SHAPES = [(1, 32), (5, 96), (96, 160), (130, 64), (64, 1024)]  # whole 32-column blocks


def block_scaled_int8(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Q8_0-like weights: codes and a float16 scale per row and 32 columns, the scales
    spread over three orders of magnitude (a single row scale could not hold them)."""
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
    scale = (10.0 ** torch.empty(rows, cols // 32).uniform_(-5, -2)).half()
    return q, scale


@pytest.mark.parametrize(("rows", "cols"), BLOCK_SHAPES)
def test_block_scaled_int8_is_within_the_int16_activation_rounding(rows: int, cols: int) -> None:
    q, scale = block_scaled_int8(rows, cols)
    x = torch.randn(1, cols)
    w = dequantize_int8(q, scale)
    exact = x.double() @ w.double().T
    got = kernels.int8_linear(x, q, scale)
    assert got is not None and got.shape == (1, rows) and got.dtype == torch.float32
    bound = (x.abs().max() * 2.0 ** -16 * w.abs().sum(1)).max()
    assert float((got.double() - exact).abs().max()) <= float(bound) * 1.01 + 1e-9


def test_block_scaled_int8_refuses_partial_blocks() -> None:
    q, scale = block_scaled_int8(4, 64)
    assert kernels.int8_linear(torch.randn(1, 48), q[:, :48], scale) is None  # scale shape


@pytest.mark.skipif(not kernels.has_int4(), reason="no C kernels here")
@pytest.mark.parametrize(("rows", "group"), [(64, 32), (80, 32), (128, 64), (48, 128)])
def test_int4_with_float32_scales_equals_the_bfloat16_kernel_math(rows: int, group: int) -> None:
    """Float32 (scale, zero) pairs: the same product as the exact dequantized one, and equal to
    the bfloat16 kernel where the pairs are bfloat16 values."""
    packed, scale_zero = quantize_int4(torch.randn(rows, 256), group)
    x = torch.randn(1, 256)
    got = kernels.int4_linear(x, packed, scale_zero.float(), group)
    assert got is not None
    bf16_pairs = kernels.int4_linear(x, packed, scale_zero, group)
    assert bf16_pairs is not None  # the same sums up to float32 rounding (the compiler may
    # order a row's scale products apart for each pair dtype): an ulp of the partial sums
    assert torch.allclose(got, bf16_pairs, rtol=1e-6, atol=1e-6 * float(got.abs().max()))
    fine = scale_zero.float() * (1 + torch.rand(scale_zero.shape) * 2**-9)  # not bfloat16
    exact = x.double() @ dequantize_int4(packed, fine).double().T
    got = kernels.int4_linear(x, packed, fine, group)
    assert got is not None and relative_error(got, exact) < 1e-4


@int4_only
def test_int4_rows_without_a_torch_kernel_go_through_the_c_kernel_in_batches() -> None:
    from edgetp.parallel.qlinear import int4_product

    packed, scale_zero = quantize_int4(torch.randn(80, 128) / 10, 32)
    x = torch.randn(13, 128)  # [T, in]: a batch of 8, then one of 5
    got = int4_product(x, packed, scale_zero, 32, kernel_layout=False)
    for t in range(13):
        assert torch.equal(got[t:t + 1], kernels.int4_linear(x[t:t + 1], packed, scale_zero, 32))
    exact = x.double() @ dequantize_int4(packed, scale_zero).double().T
    assert relative_error(got, exact) < 1e-3  # x in int16 blocks
