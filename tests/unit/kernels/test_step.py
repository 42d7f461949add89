"""Step programs (csrc/step.c through edgetp.kernels.step): each op gives bitwise what the
op-by-op C call gives, a position the attention does not take leaves everything untouched,
a failing op is reported, and the activation is silu(gate) * up whatever the row's length."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from edgetp.kernels import native
from edgetp.kernels.step import (
    AttentionShape,
    ProductKind,
    StepOp,
    StepProduct,
    StepProgram,
    add_op,
    attend_op,
    float_product,
    norm_op,
    product_op,
    silu_mul_op,
)
from edgetp.shard.quant import quantize_int4, quantize_int8, quantize_int8_blocks

pytestmark = pytest.mark.skipif(not native.available(), reason="no native kernels")

ROWS, COLS = 96, 256


def weight() -> torch.Tensor:
    return torch.randn(ROWS, COLS) / COLS**0.5


def products() -> list[tuple[str, StepProduct, Callable[[torch.Tensor], torch.Tensor | None]]]:
    """(name, the program's product, the op-by-op call it must equal) for every format."""
    w, bias = weight(), torch.randn(ROWS)
    wb, bias_b = w.bfloat16(), bias.bfloat16()
    q8, scale8 = quantize_int8(w)
    qb, scale_low = quantize_int8_blocks(w)
    scale_low = scale_low.contiguous()
    packed, pairs = quantize_int4(w, 32)
    pairs32 = pairs.float()
    found, found_b = float_product(w, bias), float_product(wb, bias_b)
    assert found is not None and found_b is not None
    return [
        ("float32 + bias", found, lambda x: native.linear(x, w) + bias),
        ("bfloat16 + bias", found_b, lambda x: native.linear(x, wb) + bias_b),
        ("int8", StepProduct(ProductKind.I8, q8, ROWS, COLS, scale8),
         lambda x: native.int8_linear(x, q8, scale8)),
        ("int8 blocks", StepProduct(ProductKind.I8_B32, qb, ROWS, COLS, scale_low[0]),
         lambda x: native.int8_linear(x, qb, scale_low[0])),
        ("int8 blocks + lows", StepProduct(ProductKind.I8_LOWS, qb, ROWS, COLS, scale_low[0],
                                           scale_low[1]),
         lambda x: native.int8_linear(x, qb, scale_low)),
        ("int4 bf16 pairs", StepProduct(ProductKind.I4_BF16, packed, ROWS, COLS, pairs,
                                        group=32),
         lambda x: native.int4_linear(x, packed, pairs, 32)),
        ("int4 f32 pairs", StepProduct(ProductKind.I4_F32, packed, ROWS, COLS, pairs32,
                                       group=32),
         lambda x: native.int4_linear(x, packed, pairs32, 32)),
    ]


def test_every_products_format_gives_the_op_by_op_bits() -> None:
    for name, product, op_by_op in products():
        dtype = product.activation  # bfloat16 for a bfloat16 weight, float32 for the others
        x, out = torch.randn(1, COLS, dtype=dtype), torch.full((1, ROWS), float("nan"),
                                                                dtype=dtype)
        assert StepProgram([product_op(product, None, out)], product.tensors()).run(x), name
        expected = op_by_op(x)
        assert expected is not None, name
        assert torch.equal(out, expected), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chain_reads_each_ops_output_and_the_runs_inputs(dtype: torch.dtype) -> None:
    """x + second -> norm -> two products -> silu(gate) * up -> a product: the MLP half, in
    float32 or in the bfloat16 compute dtype (x and mid, the residual stream, float32; the
    rest bfloat16), each op the op-by-op call's bits."""
    norm_w, gate_w, up_w = torch.randn(COLS).to(dtype), weight().to(dtype), weight().to(dtype)
    down_w = (torch.randn(COLS, ROWS) / ROWS**0.5).to(dtype)
    gate, up, down = (float_product(w, None) for w in (gate_w, up_w, down_w))
    assert gate is not None and up is not None and down is not None
    mid = torch.empty(1, COLS)
    normed, g, u, out = torch.empty(1, COLS, dtype=dtype), torch.empty(1, ROWS, dtype=dtype), \
        torch.empty(1, ROWS, dtype=dtype), torch.empty(1, COLS, dtype=dtype)
    program = StepProgram([add_op(None, None, mid, dtype), norm_op(mid, norm_w, normed, 1e-5),
                           product_op(gate, normed, g), product_op(up, normed, u),
                           silu_mul_op(g, u), product_op(down, g, out)], [mid, normed, g, u, out])
    for _ in range(2):  # other inputs through the same program
        x, second = torch.randn(1, COLS), torch.randn(1, COLS).to(dtype)
        assert program.run(x, second=second)
        assert torch.equal(mid, x + second)
        assert torch.equal(native.add_rows(x, second, torch.empty(1, COLS)), x + second)
        expected_norm = torch.empty(1, COLS, dtype=dtype)
        assert native.rmsnorm_rows(x + second, norm_w, 1e-5, expected_norm)
        gated, upped = native.linear(expected_norm, gate_w), native.linear(expected_norm, up_w)
        assert native.silu_mul(gated, upped)
        assert torch.equal(out, native.linear(gated, down_w))


def attention_case(dtype: torch.dtype) -> tuple[list[torch.Tensor], AttentionShape]:
    heads, kv_heads, hd, capacity = 4, 2, 16, 40
    q, k, v = torch.randn(1, heads * hd), torch.randn(1, kv_heads * hd), \
        torch.randn(1, kv_heads * hd)
    caches = [torch.randn(kv_heads, capacity, hd), torch.randn(kv_heads, capacity, hd)]
    angles = torch.rand(1, hd // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    return ([t.to(dtype) for t in (q, k, v, *caches)] + [cos, sin],
            AttentionShape(heads, kv_heads, hd, capacity, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_gives_attend_ones_bits_and_refuses_past_its_limit(dtype: torch.dtype
                                                                     ) -> None:
    (q, k, v, k_cache, v_cache, cos, sin), shape = attention_case(dtype)
    expected_caches = (k_cache.clone(), v_cache.clone())
    expected, scratch = torch.empty(1, q.numel(), dtype=dtype), torch.empty(shape.capacity)
    assert native.attend_one(q.clone().view(1, 4, 16), k.clone().view(1, 2, 16), v,
                             expected_caches, cos, sin, 5, 16**-0.5, scratch, expected)
    out, scores = torch.empty(1, q.numel(), dtype=dtype), torch.empty(shape.capacity)
    program = StepProgram([attend_op(q, k, v, scores, out, shape)], [q, k, v, scores, out])
    dummy = torch.empty(1, 1)
    assert program.run(dummy, 5, (k_cache, v_cache), cos, sin)
    assert torch.equal(out, expected)
    assert torch.equal(k_cache, expected_caches[0]) and torch.equal(v_cache, expected_caches[1])
    # position 32 is past the op's limit: refused, nothing written (q not even rotated)
    q_before, caches_before, out_before = q.clone(), (k_cache.clone(), v_cache.clone()), \
        out.clone()
    assert not program.run(dummy, shape.limit, (k_cache, v_cache), cos, sin)
    assert torch.equal(q, q_before) and torch.equal(out, out_before)
    assert torch.equal(k_cache, caches_before[0]) and torch.equal(v_cache, caches_before[1])


def test_a_failing_op_is_reported() -> None:
    """An op the C side does not know (here: a product of format 99) fails the run."""
    w = weight()
    product = float_product(w, None)
    assert product is not None
    bad = product_op(product, None, torch.empty(1, ROWS))
    bad.kind = 99
    assert not StepProgram([bad], [w]).run(torch.randn(1, COLS))
    assert not StepProgram([StepOp(code=42)], []).run(torch.randn(1, COLS))


def test_silu_mul_is_torchs_activation_and_each_value_its_own() -> None:
    gate, up = torch.randn(3, 1001) * 4, torch.randn(3, 1001)
    expected = F.silu(gate) * up
    out = gate.clone()
    assert native.silu_mul(out, up)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for i in (0, 17, 1000):  # one value alone: the same bits as inside the rows
        alone = gate[1, i:i + 1].clone()
        assert native.silu_mul(alone, up[1, i:i + 1].clone())
        assert torch.equal(alone, out[1, i:i + 1])
    assert not native.silu_mul(gate.double(), up.double())  # float32 and bfloat16 only
    assert not native.silu_mul(gate.bfloat16(), up)  # one dtype


def test_bfloat16_silu_mul_rounds_as_torchs_bfloat16_ops_and_each_value_is_its_own() -> None:
    """silu in float32 rounded to bfloat16, times up rounded: torch's bfloat16 F.silu (whose
    exp may differ from expf in the last float32 bit) and mul within one bfloat16 step."""
    gate, up = (torch.randn(3, 1001) * 4).bfloat16(), torch.randn(3, 1001).bfloat16()
    expected = F.silu(gate).mul(up)
    out = gate.clone()
    assert native.silu_mul(out, up)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=1e-30)
    exact = (F.silu(gate.float()).bfloat16().float() * up.float()).bfloat16()  # expf-free
    assert (out != exact).float().mean() < 0.01  # a rounding tie's other side, at most
    for i in (0, 17, 1000):
        alone = gate[1, i:i + 1].clone()
        assert native.silu_mul(alone, up[1, i:i + 1].clone())
        assert torch.equal(alone, out[1, i:i + 1])


def test_float_product_refuses_what_the_c_loops_do_not_take() -> None:
    w = weight()
    assert float_product(w.t(), None) is None  # not contiguous
    assert float_product(w.half(), None) is None  # no float16 decode ops
    assert float_product(w, torch.randn(ROWS).double()) is None
    assert float_product(w, torch.randn(ROWS + 1)) is None
    assert float_product(w.bfloat16(), torch.randn(ROWS)) is None  # the bias in x's dtype
    bf16 = float_product(w.bfloat16(), torch.randn(ROWS).bfloat16())
    assert bf16 is not None and bf16.kind == ProductKind.BF16
    assert bf16.activation == torch.bfloat16


def test_an_op_refuses_a_dtype_the_c_side_does_not_compute_in() -> None:
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        silu_mul_op(torch.empty(1, 4, dtype=torch.float16), torch.empty(1, 4,
                                                                        dtype=torch.float16))
    with pytest.raises(ValueError, match="weight's dtype"):
        norm_op(None, torch.ones(4, dtype=torch.bfloat16), torch.empty(1, 4), 1e-5)
