"""A decode step's norm and attention in C (csrc/decode_ops.c) against torch's formulas, and
the model using them only where they apply."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from edgetp.kernels import native
from edgetp.model.llama import Attention, RMSNorm, apply_rope

pytestmark = pytest.mark.skipif(not native.available(), reason="no native kernels")


def test_the_norm_of_one_row_is_torchs() -> None:
    torch.manual_seed(0)
    x, weight = torch.randn(1, 2048) * 3, torch.randn(2048)
    out = torch.empty(1, 2048)
    assert native.rmsnorm_row(x, weight, 1e-5, out)
    expected = weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def reference_attention(q, k, v, k_cache, v_cache, cos, sin, position):
    """torch's: RoPE, the cache write, SDPA with grouped heads (the copies' contents)."""
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [1, H|KV, hd]
    k_cache[:, position] = k[0]
    v_cache[:, position] = v.view(k.shape)[0]
    group = q.shape[1] // k.shape[1]
    keys = k_cache[:, :position + 1].repeat_interleave(group, 0)  # [H, S, hd]
    values = v_cache[:, :position + 1].repeat_interleave(group, 0)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values)  # [H, 1, hd]
    return out.transpose(0, 1).reshape(1, -1)


@pytest.mark.parametrize(("heads", "kv_heads", "position"), [(4, 4, 0), (8, 2, 37), (6, 3, 100),
                                                              (32, 4, 1023)])
def test_one_querys_attention_is_torchs(heads: int, kv_heads: int, position: int) -> None:
    torch.manual_seed(heads + position)
    hd, capacity = 64, 1100
    k_cache, v_cache = torch.randn(kv_heads, capacity, hd), torch.randn(kv_heads, capacity, hd)
    q, k, v = torch.randn(1, heads, hd), torch.randn(1, kv_heads, hd), torch.randn(1, kv_heads * hd)
    angles = torch.rand(1, hd // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    expected_caches = (k_cache.clone(), v_cache.clone())
    expected = reference_attention(q.clone(), k.clone(), v, *expected_caches, cos, sin, position)
    out, scratch = torch.empty(1, heads * hd), torch.empty(capacity)
    assert native.attend_one(q, k, v, (k_cache, v_cache), cos, sin, position, hd**-0.5,
                             scratch, out)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k_cache, expected_caches[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(v_cache, expected_caches[1])


@pytest.mark.parametrize(("heads", "kv_heads", "position"), [(4, 4, 0), (8, 2, 37),
                                                              (32, 4, 1023)])
def test_one_bfloat16_querys_attention_rotates_as_torch_and_attends_in_float32(
        heads: int, kv_heads: int, position: int) -> None:
    """The bfloat16 compute dtype: RoPE gives apply_rope's bfloat16 bits (the cached keys),
    v is cached as given, and the output is float32 attention over those bfloat16 values,
    rounded once."""
    torch.manual_seed(heads + position)
    hd, capacity = 64, 1100
    k_cache = torch.randn(kv_heads, capacity, hd).bfloat16()
    v_cache = torch.randn(kv_heads, capacity, hd).bfloat16()
    q, k = torch.randn(1, heads, hd).bfloat16(), torch.randn(1, kv_heads, hd).bfloat16()
    v = torch.randn(1, kv_heads * hd).bfloat16()
    angles = torch.rand(1, hd // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotated_q, rotated_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # bfloat16
    expected_keys, expected_values = k_cache.clone(), v_cache.clone()
    expected_keys[:, position], expected_values[:, position] = rotated_k[0], v.view(k.shape)[0]
    out, scratch = torch.empty(1, heads * hd, dtype=torch.bfloat16), torch.empty(capacity)
    assert native.attend_one(q, k, v, (k_cache, v_cache), cos, sin, position, hd**-0.5,
                             scratch, out)
    assert torch.equal(q, rotated_q) and torch.equal(k, rotated_k)  # rotated in place
    assert torch.equal(k_cache, expected_keys) and torch.equal(v_cache, expected_values)
    group = heads // kv_heads
    keys = k_cache[:, :position + 1].double().repeat_interleave(group, 0)  # [H, S, hd]
    values = v_cache[:, :position + 1].double().repeat_interleave(group, 0)
    scores = (rotated_q.double().transpose(0, 1) @ keys.transpose(1, 2)) * hd**-0.5
    exact = (scores.softmax(-1) @ values).transpose(0, 1).reshape(1, -1)  # [1, H*hd]
    torch.testing.assert_close(out.double(), exact, rtol=2**-8, atol=1e-5)


def test_attention_refuses_mixed_dtypes() -> None:
    hd = 8
    caches = (torch.zeros(1, 4, hd, dtype=torch.bfloat16),) * 2
    out = torch.empty(1, hd)
    assert not native.attend_one(torch.randn(1, 1, hd), torch.randn(1, 1, hd),
                                 torch.randn(1, hd), caches, torch.ones(1, hd),
                                 torch.zeros(1, hd), 0, 1.0, torch.empty(4), out)
    assert not native.attend_one(*(torch.randn(1, 1, hd).half() for _ in range(2)),
                                 torch.randn(1, hd).half(),
                                 (torch.zeros(1, 4, hd).half(),) * 2, torch.ones(1, hd),
                                 torch.zeros(1, hd), 0, 1.0, torch.empty(4), out.half())


def test_attention_past_the_cache_or_the_limit_is_left_to_torch() -> None:
    hd, kv = 8, 1
    caches = (torch.zeros(kv, 4, hd), torch.zeros(kv, 4, hd))
    args = (torch.randn(1, 1, hd), torch.randn(1, 1, hd), torch.randn(1, hd), caches,
            torch.ones(1, hd), torch.zeros(1, hd))
    out, scratch = torch.empty(1, hd), torch.empty(8)
    assert not native.attend_one(*args, 4, 1.0, scratch, out)  # the cache holds positions 0..3
    assert not native.attend_one(*args, -1, 1.0, scratch, out)
    assert torch.equal(caches[0], torch.zeros(kv, 4, hd))  # nothing written
    big = (torch.zeros(kv, 2048, hd), torch.zeros(kv, 2048, hd))
    assert not native.attend_one(*args[:3], big, *args[4:], native.ATTEND_MAX_POSITIONS, 1.0,
                                 torch.empty(2048), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_models_decode_step_takes_the_c_path_and_agrees_with_torchs(
        monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """A float32 or bfloat16 one-row step: RMSNorm and attention in C (once each), within
    rounding of the torch path (bfloat16: torch's SDPA rounds its probabilities to bfloat16,
    the C attention keeps them float32)."""
    from edgetp.config.model import parse_hf_config

    config = parse_hf_config({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                              "hidden_size": 128, "intermediate_size": 256,
                              "num_attention_heads": 8, "num_key_value_heads": 2,
                              "num_hidden_layers": 1, "vocab_size": 64,
                              "max_position_embeddings": 64})
    torch.manual_seed(3)
    attention, norm = Attention(config).eval().to(dtype), RMSNorm(128, 1e-5)
    norm.weight.data = torch.randn(128).to(dtype)
    attention.allocate_cache(64, dtype)
    norm_name = "rmsnorm_row" if dtype == torch.float32 else "rmsnorm_rows"
    calls = {"attend": 0, "norm": 0}
    for name in ("attend_one", norm_name):
        real = getattr(native, name)

        def counting(*args, _real=real, _name=name):
            calls["attend" if _name == "attend_one" else "norm"] += 1
            return _real(*args)
        monkeypatch.setattr(native, name, counting)
    close = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else \
        {"rtol": 2e-2, "atol": 2e-2}
    with torch.no_grad():
        x = torch.randn(1, 128)  # the residual stream: float32 in every mode
        angles = torch.rand(1, 8) * 6
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        steps = [attention(norm(x), p, cos, sin).clone() for p in range(3)]
        assert calls == {"attend": 3, "norm": 3}
        monkeypatch.setattr(native, "attend_one", lambda *args: False)  # the torch path
        monkeypatch.setattr(native, norm_name, lambda *args: False)
        attention.allocate_cache(64, dtype)
        for p, natively in enumerate(steps):
            torch.testing.assert_close(attention(norm(x), p, cos, sin), natively, **close)


@pytest.mark.parametrize(("rows", "group"), [(128, 32), (64 + 48, 32), (80, 64), (96, 48)])
def test_int4_weights_widen_to_bfloat16_transposed_in_c(rows: int, group: int) -> None:
    """Whole 64-row blocks and a tail of the tiled layout (and the rows layout where the group
    is not the kernel's): the weight's exact values rounded once to bfloat16, transposed."""
    from edgetp.shard.quant import dequantize_int4, int4_tiled, quantize_int4

    torch.manual_seed(rows + group)
    packed, scale_zero = quantize_int4(torch.randn(rows, 192) / 10, group)
    tiled = int4_tiled(rows, group)
    got = native.int4_bfloat16_transposed(packed, scale_zero, group, tiled)  # [in, rows]
    exact = dequantize_int4(packed, scale_zero, torch.float32)  # [rows, in]
    assert got is not None and got.shape == (192, rows) and got.dtype == torch.bfloat16
    # rounded once to bfloat16 (its step is 2^-8 of the value; a fused multiply-add may land
    # a value at a rounding tie on the other side)
    torch.testing.assert_close(got.t().float(), exact, rtol=2**-8, atol=1e-7)
    # a slice of whole blocks from the start, as a prefill chunk widens it
    if tiled and rows >= 128:
        part = native.int4_bfloat16_transposed(packed[64:128], scale_zero[:, 64:128], group,
                                               True)
        assert torch.equal(part, got[:, 64:128])


@contextmanager
def rows_widened(function: str) -> Iterator[list[int]]:
    """The row counts of every call of the native widening ``function`` made inside."""
    calls: list[int] = []
    real = getattr(native, function)

    def counting(*args):  # noqa: ANN002, ANN202
        calls.append(args[0].shape[0])
        return real(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, function, counting)
        yield calls


def test_a_prefill_chunk_of_int4_rows_uses_the_widened_weight() -> None:
    """From INT4_GEMM_ROWS rows on, an int4 product widens its weight in C and multiplies in
    bfloat16; the result is the float product within bfloat16's rounding."""
    from edgetp.parallel import qlinear
    from edgetp.shard.quant import dequantize_int4, quantize_int4

    torch.manual_seed(5)
    packed, scale_zero = quantize_int4(torch.randn(256, 128) / 10, 32)
    x = torch.randn(qlinear.INT4_GEMM_ROWS, 128)
    with rows_widened("int4_bfloat16_transposed") as calls:
        got = qlinear.int4_product(x, packed, scale_zero, 32, kernel_layout=False)
    assert sum(calls) == 256  # every row widened once
    exact = x.double() @ dequantize_int4(packed, scale_zero).double().T
    assert ((got.double() - exact).norm() / exact.norm()).item() < 1e-2


@pytest.mark.parametrize("symmetric", [False, True])
def test_block_scaled_int8_weights_widen_to_bfloat16_in_c(symmetric: bool) -> None:
    """Both block layouts (scale and low end; a GGUF Q8_0's scale alone): the exact float32
    values rounded once to bfloat16, into a given buffer too."""
    from edgetp.shard.quant import dequantize_int8, quantize_int8_blocks

    torch.manual_seed(3)
    codes, scales = quantize_int8_blocks(torch.randn(70, 96) / 10)
    if symmetric:
        scales = scales[0]  # [rows, in / 32]: value = code * scale
    exact = dequantize_int8(codes, scales, torch.float32)  # [rows, in]
    got = native.int8_blocks_bfloat16(codes, scales)
    assert got is not None and got.dtype == torch.bfloat16
    assert torch.equal(got, exact.to(torch.bfloat16))
    out = torch.empty(20, 96, dtype=torch.bfloat16)
    assert native.int8_blocks_bfloat16(codes[10:30], scales[..., 10:30, :], out) is out
    assert torch.equal(out, got[10:30])


def test_a_prefill_chunk_of_block_scaled_int8_uses_the_widened_weight() -> None:
    from edgetp.parallel import qlinear
    from edgetp.shard.quant import dequantize_int8, quantize_int8_blocks

    torch.manual_seed(6)
    codes, scales = quantize_int8_blocks(torch.randn(200, 128) / 10)
    x = torch.randn(qlinear.GEMM_ROWS, 128)
    with rows_widened("int8_blocks_bfloat16") as calls:
        got = qlinear.int8_matmul(x, codes, scales, kernel=True)
    assert sum(calls) == 200  # every row widened once
    exact = x.double() @ dequantize_int8(codes, scales).double().T
    assert ((got.double() - exact).norm() / exact.norm()).item() < 1e-2


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_the_norm_of_a_chunks_rows_is_torchs_and_a_float32_rows_is_the_one_row_norms(
        weight_dtype: torch.dtype) -> None:
    """RMSNorm of a prefill chunk in one C pass (rows of a wider tensor included): torch's
    formula within float32 rounding, rounded once to a bfloat16 weight's dtype; each float32
    row exactly the one-row norm a decode step computes."""
    torch.manual_seed(1)
    wide = torch.randn(37, 2 * 2000) * 4  # rows strided: x is a column slice of it
    x, weight = wide[:, :2000], (torch.randn(2000) * 2).to(weight_dtype)
    out = torch.empty(37, 2000, dtype=weight_dtype)
    assert native.rmsnorm_rows(x, weight, 1e-5, out)
    x32 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    expected = (weight.float() * x32).to(weight_dtype)
    bf16 = weight_dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=8e-3 if bf16 else 1e-5, atol=1e-6)
    if not bf16:
        for i in (0, 17, 36):
            row = torch.empty(1, 2000)
            assert native.rmsnorm_row(x[i:i + 1].contiguous(), weight, 1e-5, row)
            assert torch.equal(out[i:i + 1], row)


def test_a_chunks_norm_takes_the_c_pass_and_falls_back_to_torch_alike(
        monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    norm = RMSNorm(512, 1e-5)
    norm.weight.data = torch.randn(512).to(torch.bfloat16)
    x = torch.randn(9, 512)
    calls = []
    real = native.rmsnorm_rows
    monkeypatch.setattr(native, "rmsnorm_rows", lambda *args: calls.append(1) or real(*args))
    with torch.no_grad():
        native_out = norm(x)
        assert calls == [1]
        monkeypatch.setattr(native, "rmsnorm_rows", lambda *args: False)  # the torch path
        torch_out = norm(x)
    assert native_out.dtype == torch_out.dtype == torch.bfloat16
    torch.testing.assert_close(native_out, torch_out, rtol=8e-3, atol=1e-6)


def test_a_nan_stays_a_nan_when_rounded_to_bfloat16() -> None:
    """A NaN whose low bits are all set (0x7FFFFFFF) must not round like a number: adding the
    rounding bias carries into the sign and gives -0, a silent zero where the NaN should show
    (csrc/bf16.h); and every finite value rounds as torch's conversion does."""
    x = torch.randn(3, 64)
    x[1, 5] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)
    weight, out = torch.ones(64), torch.empty(3, 64, dtype=torch.bfloat16)
    assert native.rmsnorm_rows(x, weight, 1e-5, out)
    assert bool(torch.isnan(out[1]).all())
    expected = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    torch.testing.assert_close(out[[0, 2]], expected[[0, 2]], rtol=1e-2, atol=1e-2)
