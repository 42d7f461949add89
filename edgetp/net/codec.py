"""Activations on the wire: ``f32``, ``bf16``, or ``int8`` with one float32 scale per row.

A partial or a sum of shape ``[T, d]`` goes as one tensor (``f32``/``bf16``) or, for ``int8``,
as two: the codes, int8 ``[T, d]``, and the scales, float32 ``[T, 1]``, with
``x ~= codes * scale`` and ``scale = max|x_row| / 127`` (a row of zeros gets scale 1).

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


def check_format(wire: str) -> str:
    if wire not in WIRE_FORMATS:
        raise ConfigError(f"--wire-dtype {wire!r}: choose one of {', '.join(WIRE_FORMATS)}")
    return wire


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d] -> (codes int8 [T, d], scale float32 [T, 1])."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True)  # [T, 1]
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    codes = torch.round(x32 / scale).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def encode(x: torch.Tensor, wire: str) -> list[torch.Tensor]:
    """The tensor frames that carry ``x`` [T, d] in format ``wire``."""
    if wire == "int8":
        return list(quantize_rows(x))
    return [x.to(FLOAT_WIRE[wire]).contiguous()]


def decode(tensors: Sequence[torch.Tensor], wire: str) -> torch.Tensor:
    """Frames of :func:`encode` -> float32 [T, d] (a fresh tensor)."""
    if wire == "int8":
        return tensors[0].float() * tensors[1]
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
        if tuple(scale.shape) != (*shape[:-1], 1):
            return f"with scales of shape {list(scale.shape)}, expected {[*shape[:-1], 1]}"
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
    total = round_trip(own, wire)  # the master's partial rounded like everyone else's
    for frames in parts:
        total += decode(frames, wire)
    frames = encode(total, wire)
    return decode(frames, wire), frames
