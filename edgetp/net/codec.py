"""Activations on the wire: ``f32``, ``bf16``, or ``int8`` in blocks of 64 values.

A partial or a sum of shape ``[T, d]`` goes as one tensor (``f32``/``bf16``) or, for ``int8``,
as two: the codes, int8 ``[T, d]``, and per block of :data:`INT8_BLOCK` consecutive values of
a row (the last block of a row may be shorter) two float32 numbers, ``[T, ceil(d / 64), 2]``:
the block's scale and its largest value. The largest value (by magnitude) travels exactly, its
position marked by the code -128; the others are ``codes * scale`` with codes in -127..127 and
``scale = (the largest magnitude of the others) / 127`` (1 when they are all zero), so every
value is within ``scale / 2`` of what was sent, and the outlier exact.

Why: a real model's partials have a few channels hundreds of times larger than the median
(SmolLM2-135M: up to 520x). One scale per row let them swamp every other channel (mean KL 0.13
over a text); one per block of 32 still cost 0.024, because each outlier coarsens its block;
carrying each block's largest value exactly brings it to ~0.002, for 1/8 more bytes than the
codes alone.

The star allreduce (:func:`star_sum`) keeps every rank consistent whatever the format: the
master rounds its own partial exactly as a worker's is rounded on the wire, adds the decoded
partials in float32 in rank order (exact for what arrived), encodes the sum once, and uses
the *decoded* sum itself, the same values every worker decodes from the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edgetp.core.errors import ConfigError

WIRE_FORMATS = ("f32", "bf16", "int8")
FLOAT_WIRE = {"f32": torch.float32, "bf16": torch.bfloat16}
INT8_BLOCK = 64  # values of a row per int8 scale (and per exact outlier)
OUTLIER_CODE = -128  # the int8 code that marks a block's largest value, sent exactly


def check_format(wire: str) -> str:
    if wire not in WIRE_FORMATS:
        raise ConfigError(f"--wire-dtype {wire!r}: choose one of {', '.join(WIRE_FORMATS)}")
    return wire


BF16_CARRY_MIN_VALUES = 16 << 10  # a bfloat16 partial this large or larger goes as bf16


def carried_format(wire: str, dtype: torch.dtype | str, values: int) -> str:
    """The format a partial of ``values`` values in ``dtype`` travels in on a ``wire``
    cluster: a bfloat16 partial (bfloat16 compute) of at least :data:`BF16_CARRY_MIN_VALUES`
    (a prefill chunk's) goes as ``bf16`` where the wire is ``f32``. Its values are exactly
    bfloat16 already, so that is half the bytes and no conversion for the same numbers, and
    the sum is the same bits: added in float32 in rank order, then rounded once to bfloat16,
    by the encoding here as by the caller's cast of an ``f32`` sum. A decode step's smaller
    partial stays float32, which two nodes exchange in one native call (faster than half the
    bytes through Python). Every rank decides alike: it depends on the shape alone."""
    bfloat16 = dtype in (torch.bfloat16, "bfloat16")  # a dtype or its name (the planner's)
    return "bf16" if wire == "f32" and bfloat16 and values >= BF16_CARRY_MIN_VALUES else wire


def scale_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of the int8 scales for codes of ``shape`` [..., d]: [..., ceil(d / 64), 2]."""
    return (*shape[:-1], -(-shape[-1] // INT8_BLOCK), 2)


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d] -> (codes int8 [T, d], (scale, outlier) float32 [T, nb, 2])."""
    x32 = x.float()
    d = x32.shape[-1]
    blocks = _padded(x32).unflatten(-1, (-1, INT8_BLOCK))  # [T, nb, 64]
    magnitude = blocks.abs()
    top = magnitude.argmax(dim=-1, keepdim=True)  # [T, nb, 1]: the block's outlier
    outlier = blocks.gather(-1, top)  # [T, nb, 1]
    amax = magnitude.scatter(-1, top, 0.0).amax(dim=-1)  # [T, nb]: the others' largest
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    codes = torch.round(blocks / scale[..., None]).clamp_(-127, 127)
    codes.scatter_(-1, top, OUTLIER_CODE)
    scales = torch.cat((scale[..., None], outlier), dim=-1)  # [T, nb, 2]
    return codes.flatten(-2)[..., :d].to(torch.int8).contiguous(), scales


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(codes int8 [T, d], scales float32 [T, nb, 2]) -> float32 [T, d] (a fresh tensor)."""
    d = codes.shape[-1]
    blocks = _padded(codes.float()).unflatten(-1, (-1, INT8_BLOCK))  # [T, nb, 64]
    values = blocks * scales[..., :1]
    values = torch.where(blocks == OUTLIER_CODE, scales[..., 1:].expand_as(values), values)
    return values.flatten(-2)[..., :d].contiguous()


def _padded(x: torch.Tensor) -> torch.Tensor:
    """x [..., d] with zeros up to a multiple of the block: [..., nb * 32]."""
    pad = -x.shape[-1] % INT8_BLOCK
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def encode(x: torch.Tensor, wire: str) -> list[torch.Tensor]:
    """The tensor frames that carry ``x`` [T, d] in format ``wire``."""
    if wire == "int8":
        return list(quantize_blocks(x))
    return [x.to(FLOAT_WIRE[wire]).contiguous()]


def decode(tensors: Sequence[torch.Tensor], wire: str) -> torch.Tensor:
    """Frames of :func:`encode` -> float32 [T, d] (a fresh tensor)."""
    if wire == "int8":
        return dequantize_blocks(tensors[0], tensors[1])
    return tensors[0].to(torch.float32, copy=True)


def round_trip(x: torch.Tensor, wire: str) -> torch.Tensor:
    """``x`` as the receiver sees it, float32."""
    return decode(encode(x, wire), wire)


def payload_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def check_payload(tensors: Sequence[torch.Tensor], wire: str,
                  shape: Sequence[int]) -> str | None:
    """What is wrong with a received partial or sum (None if it is a valid ``[T, d]``)."""
    want = 2 if wire == "int8" else 1
    if len(tensors) != want:
        return f"{len(tensors)} tensors, expected {want} for wire dtype {wire}"
    if tuple(tensors[0].shape) != tuple(shape):
        return f"of shape {list(tensors[0].shape)}, expected {list(shape)}"
    if wire == "int8":
        codes, scale = tensors
        if codes.dtype != torch.int8 or scale.dtype != torch.float32:
            return f"of dtypes {codes.dtype}/{scale.dtype}, expected int8 codes, float32 scales"
        if tuple(scale.shape) != scale_shape(shape):
            return f"with scales of shape {list(scale.shape)}, expected {list(scale_shape(shape))}"
        if not bool(torch.isfinite(scale).all()):
            return "with non-finite scales"
    elif tensors[0].dtype != FLOAT_WIRE[wire]:
        return f"of dtype {tensors[0].dtype}, expected {FLOAT_WIRE[wire]}"
    return None


def star_sum(own: torch.Tensor, parts: Sequence[Sequence[torch.Tensor]], wire: str
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The master's side of a star allreduce.

    ``own``: the master's partial [T, d]; ``parts``: the workers' frames in rank order.
    Returns (the sum every rank uses, float32 [T, d]; the frames that carry it to the workers).
    """
    return _sum_in_rank_order(round_trip(own, wire), parts, wire)  # the master's partial
    # rounded like everyone else's


def pair_sum(master: Sequence[torch.Tensor], own: Sequence[torch.Tensor], wire: str
             ) -> torch.Tensor:
    """The worker's side of a two-rank exchange: the master's partial (its frames as sent) plus
    this worker's (its frames as sent), float32 [T, d]: bitwise the sum :func:`star_sum` gives
    the master from the same two partials."""
    return _sum_in_rank_order(decode(master, wire), [own], wire)[0]


def _sum_in_rank_order(first: torch.Tensor, parts: Sequence[Sequence[torch.Tensor]], wire: str
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``first`` (rank 0's partial as received, a fresh float32 tensor) plus each later rank's
    frames in rank order; returns the sum as the wire rounds it, and its frames."""
    total = first
    for frames in parts:
        total += frames[0] if wire == "f32" else decode(frames, wire)  # f32: no copy needed
    if wire == "f32":  # the sum is its own frame: a prefill chunk's 1 MiB copied twice less
        return total, [total]
    frames = encode(total, wire)
    return decode(frames, wire), frames
