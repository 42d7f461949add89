"""edgetp.net.codec: activations on the wire (f32, bf16, int8 in blocks of 64 values, each
block's largest value exact).

* int8 round trips stay within half a scale of *each block*, the block's outlier exact, for
  widths that are and are not multiples of the block, with zero blocks decoding to zeros;
* a large channel costs nothing to its block's other values (what one scale per row, and
  still one per block without the exact outlier, got wrong);
* received frames of the wrong count, dtype or scale shape are refused (``check_payload`` and
  the wire's own decoder), never decoded into a wrong answer;
* the star sum and the ring agree on every rank bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from helpers.ring import ring_sums

from edgetp.net import wire
from edgetp.net.codec import (
    BF16_CARRY_MIN_VALUES,
    INT8_BLOCK,
    OUTLIER_CODE,
    carried_format,
    check_payload,
    decode,
    encode,
    pair_sum,
    quantize_blocks,
    round_trip,
    scale_shape,
    star_sum,
)
from edgetp.net.collectives import summed_pair
from edgetp.net.wire import WireError

PARTIAL = {"seq": 1, "step": 1, "index": 0}


def block_scales_per_value(scales: torch.Tensor, width: int) -> torch.Tensor:
    """scales [T, nb, 2] -> [T, width]: each value's own block scale."""
    return scales[..., 0].repeat_interleave(INT8_BLOCK, dim=-1)[..., :width]


@pytest.mark.parametrize("width", [96, 100, 11, 1, 64, 130])
def test_int8_round_trip_within_half_a_block_scale_and_outliers_exact(width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(5, width, generator=gen) * torch.logspace(-4, 3, 5)[:, None]
    x[2] = 0.0
    codes, scales = quantize_blocks(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scales.dtype == torch.float32 and tuple(scales.shape) == scale_shape(x.shape)
    assert scales.shape[-2:] == (-(-width // INT8_BLOCK), 2)
    back = round_trip(x, "int8")
    assert back.dtype == torch.float32 and back.shape == x.shape
    assert torch.equal(back[2], torch.zeros(width))
    bound = block_scales_per_value(scales, width) / 2 * (1 + 1e-6)
    assert ((back - x).abs() <= bound).all()
    outliers = codes == OUTLIER_CODE
    assert torch.equal(back[outliers], x[outliers])
    assert int(outliers[[0, 1, 3, 4]].sum()) == 4 * scales.shape[-2]  # one per block
    assert torch.equal(round_trip(x, "f32"), x)
    assert torch.equal(round_trip(x, "bf16"), x.to(torch.bfloat16).float())


def test_a_large_channel_costs_its_block_nothing() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 576, generator=gen)
    x[0, 100] = 400.0  # one outlier channel, as real models' partials have
    back = round_trip(x, "int8")
    assert float(back[0, 100]) == 400.0
    own = slice(100 // INT8_BLOCK * INT8_BLOCK, (100 // INT8_BLOCK + 1) * INT8_BLOCK)
    others = x[0, own].abs().sort().values[-2]  # the block's largest but the outlier
    assert float((back - x)[0, own].abs().max()) <= float(others) / 127 / 2 * (1 + 1e-6)


def test_check_payload_refuses_wrong_frames() -> None:
    x = torch.randn(3, 100)  # two blocks: 64 and 36
    frames = encode(x, "int8")
    assert check_payload(frames, "int8", (3, 100)) is None
    assert "expected 2" in check_payload(encode(x, "f32"), "int8", (3, 100))
    assert "of shape" in check_payload(frames, "int8", (3, 101))
    for bad_scale in (frames[1][:, :1], frames[1][..., 0], torch.ones(3, 1), torch.ones(3, 3, 2),
                      torch.ones(2, 2, 2), torch.ones(3, 2, 1)):
        assert "scales of shape" in check_payload([frames[0], bad_scale], "int8", (3, 100))
    assert "dtypes" in check_payload([frames[0].float(), frames[1]], "int8", (3, 100))
    nan = frames[1].clone()
    nan[1, 1, 1] = float("nan")
    assert "non-finite" in check_payload([frames[0], nan], "int8", (3, 100))


def test_the_wire_refuses_malformed_int8_frames() -> None:
    frames = encode(torch.randn(3, 100), "int8")
    good = wire.decode(wire.encode("partial", PARTIAL, frames))
    assert torch.equal(decode(good.tensors, "int8"), decode(frames, "int8"))
    for bad in ([frames[0], torch.ones(3, 1)], [frames[0], torch.ones(3, 2)],
                [frames[0], torch.ones(3, 3, 2)], [frames[0], torch.ones(2, 2, 2)],
                [frames[0].float(), frames[1]], [frames[0], frames[1].double()],
                [frames[1], frames[0]]):
        with pytest.raises(WireError):
            wire.decode(wire.encode("partial", PARTIAL, bad))


@pytest.mark.parametrize("fmt", ["f32", "bf16", "int8"])
def test_star_sum_is_the_float32_sum_of_the_decoded_partials(fmt: str) -> None:
    gen = torch.Generator().manual_seed(0)
    own, *others = [torch.randn(4, 150, generator=gen) * (r + 1) for r in range(3)]
    frames = [encode(p, fmt) for p in others]
    total, sent = star_sum(own.clone(), frames, fmt)
    exact = round_trip(own, fmt) + decode(frames[0], fmt) + decode(frames[1], fmt)
    assert torch.equal(total, decode(encode(exact, fmt), fmt))
    assert torch.equal(decode(sent, fmt), total)  # workers decode exactly what the master uses


@pytest.mark.parametrize("fmt", ["f32", "bf16", "int8"])
def test_a_workers_pair_sum_is_the_masters_star_sum_bitwise(fmt: str) -> None:
    """Two ranks exchanging partials: the worker's sum of the master's frames and its own is
    exactly the sum the master computes (a decode step's rows stay identical on both)."""
    gen = torch.Generator().manual_seed(1)
    master, worker = torch.randn(3, 200, generator=gen), torch.randn(3, 200, generator=gen) * 7
    master_frames, worker_frames = encode(master, fmt), encode(worker, fmt)
    masters_total, _ = star_sum(master.clone(), [worker_frames], fmt)
    workers_total = pair_sum(master_frames, worker_frames, fmt)
    assert torch.equal(workers_total, masters_total)
    assert torch.equal(master_frames[0], encode(master, fmt)[0])  # the frames are left alone


def test_ring_allreduce_with_the_int8_wire() -> None:
    """Three ring links in one process: the same int8-rounded sum, bitwise, on every rank."""
    inputs = [torch.randn(2, 140, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    outputs = ring_sums(inputs, "int8")
    exact = inputs[0] + inputs[1] + inputs[2]
    assert sorted(outputs) == [0, 1, 2]
    for rank in range(3):
        assert torch.equal(outputs[rank], outputs[0])
    largest = float(sum(x.abs() for x in inputs).max())  # no partial sum exceeds it
    assert float((outputs[0] - exact).abs().max()) <= 3 * largest / 127 / 2  # 3 roundings


def test_bfloat16_partials_on_the_f32_wire_carry_the_same_sums_in_half_the_bytes() -> None:
    """A bfloat16 partial goes as bf16 on an f32 cluster: the star's and the exchange's sums,
    cast to bfloat16 as the layers use them, are the f32 wire's bits."""
    chunk = BF16_CARRY_MIN_VALUES
    assert carried_format("f32", torch.bfloat16, chunk) == "bf16"
    assert carried_format("f32", torch.bfloat16, chunk - 1) == "f32"  # a decode step's
    assert carried_format("f32", torch.float32, chunk) == "f32"
    assert carried_format("int8", torch.bfloat16, chunk) == "int8"
    generator = torch.Generator().manual_seed(4)
    parts = [(torch.randn(3, 512, generator=generator) * 50).to(torch.bfloat16)
             for _ in range(3)]
    own, workers = parts[0], parts[1:]
    as_f32 = star_sum(own, [encode(w, "f32") for w in workers], "f32")[0]
    as_bf16, frames = star_sum(own, [encode(w, "bf16") for w in workers], "bf16")
    assert torch.equal(as_bf16.to(torch.bfloat16), as_f32.to(torch.bfloat16))
    assert frames[0].dtype == torch.bfloat16
    pair_f32 = pair_sum(encode(own, "f32"), encode(workers[0], "f32"), "f32")
    pair_bf16 = pair_sum(encode(own, "bf16"), encode(workers[0], "bf16"), "bf16")
    assert torch.equal(pair_bf16.to(torch.bfloat16), pair_f32.to(torch.bfloat16))


@pytest.mark.parametrize("wire_format", ["f32", "bf16"])
def test_the_exchanges_short_cut_sums_are_pair_sums_bits(wire_format: str) -> None:
    """summed_pair's short cuts (an f32 partial summed in place; a bfloat16 one summed in
    bfloat16) give, on both ranks, the bits of pair_sum cast to the partial's dtype, over
    magnitudes far apart (where a float32 sum rounds before the bfloat16 rounding)."""
    dtype = torch.float32 if wire_format == "f32" else torch.bfloat16
    generator = torch.Generator().manual_seed(5)

    def partial() -> torch.Tensor:  # [64, 512], magnitudes e^-24 .. e^24
        spread = torch.exp(torch.randn(64, 512, generator=generator) * 8)
        return (torch.randn(64, 512, generator=generator) * spread).to(dtype)

    master, worker = partial(), partial()
    expected = pair_sum(encode(master, wire_format), encode(worker, wire_format),
                        wire_format).to(dtype)
    for rank, own in ((0, master), (1, worker)):
        frames = encode(master, wire_format), encode(worker, wire_format)
        total = summed_pair(own.clone(), *frames, rank, wire_format).to(dtype)
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert torch.equal(total.view(bits), expected.view(bits))
