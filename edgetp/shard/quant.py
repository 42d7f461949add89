"""Quantized weight formats: int8 in blocks of 32 input columns, int4 group-wise along the input.

Both formats are written by the splitter next to their scales, in the per-rank safetensors
files, and read back as-is (the window binds them straight from disk into compute buffers):

``int8``
    ``NAME`` I8 ``[out, in]`` and ``NAME_scale`` F16 ``[2, out, in / 32]`` holding a scale and
    the block's lowest value per row and block of :data:`INT8_BLOCK` input columns:
    asymmetric, ``w ~= (q + 128) * scale + low`` with ``q`` in ``-128..127``
    (:func:`quantize_int8_blocks`; ``low`` rounded down and ``scale`` up to float16, so
    ``|w - deq| <= scale / 2``). Blocks never straddle two ranks' slices, so the quantized
    model is the same whatever the node count. A weight whose slices are not whole blocks
    wide (:func:`int8_blocked`) keeps the older per-channel format: ``NAME_scale`` BF16
    ``[out]``, symmetric, ``w ~= q * scale`` with ``q`` in ``-127..127`` and ``amax / 127``
    rounded up; for row-parallel weights (o_proj, down_proj) ``amax`` is taken over the whole
    row, not just the rank's slice, for the same reason.

``int4``
    ``NAME`` U8 ``[out, in / 2]`` (two 4-bit codes per byte) and ``NAME_scale`` BF16
    ``[in / group, out, 2]`` holding ``(scale, zero)`` per group of ``group`` consecutive input
    columns: asymmetric, ``w ~= (q - 8) * scale + zero`` with ``q`` in ``0..15`` (the layout
    and the formula of torch's CPU int4 kernel, so no conversion is needed at load time). The
    zero is the group's ``min + 8 * scale`` rounded to bfloat16; the scale is then chosen (and
    rounded up) so that both the group's min and max are representable, which makes
    ``|w - deq| <= scale / 2`` hold exactly.

    Code layout: when ``out`` is a multiple of 16 and the group one the kernel takes
    (32/64/128/256) the bytes are *tiled* as torch's AVX-512 int4 kernel wants them (blocks of
    64 rows; per input column 32 bytes, byte ``j`` = row ``j`` | row ``j + 32`` << 4; a last
    block of 16/32/48 rows pairs adjacent rows). Otherwise the layout is *rows*: byte ``c`` of
    row ``r`` = code ``(r, 2c)`` | code ``(r, 2c + 1)`` << 4. Which layout a tensor uses is a
    function of its shape and group (:func:`int4_tiled`), so nothing else needs recording.

Two variants keep the blocks of a GGUF file as they are (``edgetp.shard.gguf_blocks``), told
apart by their scales' dtype and shape, so nothing else records them:

``int8`` with block scales
    ``NAME_scale`` F16 ``[out, in / 32]``: ``w = q * scale`` per row and block of
    :data:`INT8_BLOCK` input columns (llama.cpp's Q8_0, whose float16 scales are kept exactly).
``int4`` with float32 scales
    ``NAME_scale`` F32 ``[in / group, out, 2]``, same formula: Q4_0 (``w = d * (q - 8)``) is
    ``scale = d, zero = 0``, Q4_1 (``w = d * q + m``) is ``scale = d, zero = m + 8 d``, which
    float32 holds exactly where bfloat16 would round it.

The group size of a tensor is implied by its shapes (``in / scale.shape[0]``); the splitter
picks per tensor name the largest power of two up to the requested group that divides every
rank's slice width (:func:`int4_group`), and refuses groups below :data:`MIN_INT4_GROUP`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import torch

from edgetp.core.errors import ConfigError

QUANT_DTYPES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)  # the choices of --group-size
MIN_INT4_GROUP = 8
INT8_BLOCK = 32  # input columns per scale of block-scaled int8
KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4 kernel accepts
SCALE_SUFFIX = "_scale"
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj", "lm_head")
_TINY = torch.finfo(torch.bfloat16).tiny
_TINY_F16 = torch.finfo(torch.float16).tiny
CHUNK_ELEMENTS = 1 << 17  # values quantized at a time: 512 KiB of float32, held in cache


HEAD_DTYPES = ("int8", "int4", "same", "float")  # --head-dtype: "float" keeps it unquantized


class QuantError(ConfigError):
    """A weight cannot be quantized as requested; the message says what would work."""


def head_format(dtype: str, head_dtype: str | None, float_dtype: str) -> str:
    """What a split of ``dtype`` stores its lm_head (a tied one too) as: int8, int4, or a float
    dtype name. ``head_dtype`` is ``--head-dtype`` (None: int8 for int4 splits, where a 4-bit
    head costs most of int4's loss, else the split's dtype); ``float_dtype`` the split's float
    dtype (the checkpoint's in a quantized split)."""
    if head_dtype is None:
        head_dtype = "int8" if dtype == "int4" else "same"
    if head_dtype not in HEAD_DTYPES:
        raise QuantError(f"--head-dtype {head_dtype!r}: choose one of {', '.join(HEAD_DTYPES)}")
    return {"same": dtype, "float": float_dtype}.get(head_dtype, head_dtype)


def is_quantized_weight(name: str) -> bool:
    """Whether the tensor ``name`` (e.g. ``mlp.down_proj.weight``) is stored quantized."""
    owner, _, attr = name.rpartition(".")
    return attr == "weight" and owner.rpartition(".")[2] in QUANTIZED_LINEARS


def bf16_at_least(x: torch.Tensor) -> torch.Tensor:
    """``x`` (positive float32) rounded to the nearest bfloat16 not below it."""
    rounded = x.to(torch.bfloat16)
    bumped = (rounded.view(torch.int16) + 1).view(torch.bfloat16)  # next bf16 up (x > 0)
    return torch.where(rounded.float() < x, bumped, rounded)


# -- int8 -------------------------------------------------------------------------------------


def int8_blocked(widths: Iterable[int]) -> bool:
    """Whether an int8 weight whose slices are ``widths`` columns wide (the whole width among
    them) is stored in blocks (:func:`quantize_int8_blocks`): every width a multiple of
    :data:`INT8_BLOCK`, so each block lies in one rank's slice whatever the node count."""
    return all(width % INT8_BLOCK == 0 for width in widths)


def f16_toward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """``x`` (float32) rounded to the nearest float16 not below it (``up``) or not above it."""
    rounded = x.to(torch.float16)
    wrong = rounded.float() < x if up else rounded.float() > x
    return torch.where(wrong, torch.nextafter(rounded, torch.full_like(
        rounded, float("inf") if up else float("-inf"))), rounded)


def quantize_int8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int8 [out, in], scale_low f16 [2, out, in / 32]).

    Per row and block of :data:`INT8_BLOCK` columns a scale and the block's lowest value:
    ``w = (q + 128) * scale + low``, the 256 codes spanning exactly [low, high] (``low``
    rounded down and ``scale`` up to float16, so both ends stay reachable and
    ``|w - deq| <= scale / 2``). A scale *and* a low end per block hold weights that were
    4-bit with a minimum (GGUF's Q4_1, natively 4-bit checkpoints) exactly, where a symmetric
    scale per row or per block wastes the codes below the block's minimum.
    """
    out_features, in_features = w.shape
    if in_features % INT8_BLOCK:
        raise QuantError(f"int8 blocks of {INT8_BLOCK} do not divide {in_features} columns")
    q = torch.empty(w.shape, dtype=torch.int8)
    scale_low = torch.empty(2, out_features, in_features // INT8_BLOCK, dtype=torch.float16)
    for rows in row_chunks(out_features, in_features):  # each chunk while it is in cache
        blocks = w[rows].float().view(-1, in_features // INT8_BLOCK, INT8_BLOCK)  # [r, nb, 32]
        low, high = torch.aminmax(blocks, dim=-1)  # [r, nb]
        low16 = f16_toward(low, up=False)
        scale16 = f16_toward(((high - low16.float()) / 255).clamp_min(_TINY_F16), up=True)
        codes = torch.sub(blocks, low16.float()[..., None]).div_(scale16.float()[..., None])
        q[rows] = codes.round_().clamp_(0, 255).sub_(128).view(-1, in_features)
        scale_low[0, rows], scale_low[1, rows] = scale16, low16
    return q, scale_low


def quantize_int8(w: torch.Tensor, amax: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int8 [out, in], scale bf16 [out]): one symmetric scale per row, for
    weights whose slices are not whole :data:`INT8_BLOCK`-column blocks (else
    :func:`quantize_int8_blocks`).

    ``amax`` [out] (default: each row's own) lets a slice of a row share the whole row's scale.
    """
    w = w.float()  # no copy when it is float32 already
    if amax is None:
        amax = row_amax(w)
    scale = bf16_at_least((amax.float() / 127).clamp_min(_TINY))  # [out]
    scale32 = scale.float()[:, None]  # [out, 1]
    q = torch.empty(w.shape, dtype=torch.int8)
    for rows in row_chunks(*w.shape):  # a few passes over each chunk while it is in cache
        q[rows] = torch.div(w[rows], scale32[rows]).round_().clamp_(-127, 127)
    return q, scale


def row_amax(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] -> max |w| of each row [out], float32, in one pass without a copy."""
    low, high = torch.aminmax(w.float(), dim=1)
    return torch.maximum(high, -low)


def row_chunks(rows: int, cols: int, align: int = 64) -> Iterator[slice]:
    """Slices of whole rows of about :data:`CHUNK_ELEMENTS` values (multiples of ``align``
    rows, the tiled int4 layout's blocks, but the last), so that each step of quantizing a
    chunk finds it in the CPU's cache instead of streaming the whole tensor from memory."""
    step = max(align, CHUNK_ELEMENTS // max(cols, 1) // align * align)
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q [out, in], scale [out], [out, in / 32] or [2, out, in / 32]) -> ``dtype`` [out, in]."""
    out_features, in_features = q.shape
    if scale.dim() == 1:
        return q.to(dtype) * scale.to(dtype)[:, None]
    blocks = q.to(dtype).view(out_features, -1, INT8_BLOCK)  # [out, nb, 32]
    if scale.dim() == 2:  # symmetric block scales (a GGUF's Q8_0)
        return (blocks * scale.to(dtype)[..., None]).view(out_features, in_features)
    step, low = scale.to(dtype)[..., None]  # [out, nb, 1] each
    return ((blocks + 128) * step + low).view(out_features, in_features)


def int8_scale_rows(scale: torch.Tensor, rows: slice) -> torch.Tensor:
    """The scales of output ``rows`` of an int8 weight, in any of its scale layouts."""
    return scale[:, rows] if scale.dim() == 3 else scale[rows]


# -- int4 -------------------------------------------------------------------------------------


def int4_group(widths: Iterable[int], requested: int, what: str = "a weight") -> int:
    """The largest power of two <= ``requested`` dividing every width; QuantError below 8."""
    widths = sorted(set(widths))
    group = requested
    while group >= MIN_INT4_GROUP:
        if all(w % group == 0 for w in widths):
            return group
        group //= 2
    raise QuantError(
        f"int4 cannot quantize {what}: its input is split into slices of {widths} columns and "
        f"no group of {MIN_INT4_GROUP} to {requested} columns divides them all; use --dtype "
        "int8, or another node count or --shares"
    )


def int4_tiled(out_features: int, group: int) -> bool:
    """Whether a tensor uses the kernel's tiled code layout (else the plain rows layout)."""
    return out_features % 16 == 0 and group in KERNEL_GROUPS


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (packed uint8 [out, in / 2], scale_zero bf16 [in / group, out, 2])."""
    out_features, in_features = w.shape
    if group < 2 or in_features % group:
        raise QuantError(f"int4 group {group} does not divide {in_features} input columns")
    tiled = int4_tiled(out_features, group)
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
    scale_zero = torch.empty(in_features // group, out_features, 2, dtype=torch.bfloat16)
    for rows in row_chunks(out_features, in_features):  # 64-row blocks: packs independently
        codes, scale_zero[:, rows] = _int4_chunk(w[rows], group)
        packed[rows] = pack_int4(codes, tiled)
    return packed, scale_zero


def int4_codes(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (codes uint8 [out, in] in 0..15, scale_zero bf16 [in / group, out, 2])."""
    return _int4_chunk(w, group)


def _int4_chunk(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [rows, in] -> (codes uint8 [rows, in], scale_zero bf16 [in / group, rows, 2])."""
    out_features, in_features = w.shape
    wg = w.float().view(out_features, in_features // group, group)  # [out, ng, g]
    low, high = torch.aminmax(wg, dim=-1)  # [out, ng]
    zero = (low + (high - low) * (8 / 15)).to(torch.bfloat16).float()  # value of code 8
    span = torch.maximum((high - zero) / 7, (zero - low) / 8)  # codes 15 and 0 reach high, low
    scale = bf16_at_least(span.clamp_min(_TINY)).float()  # [out, ng]
    codes = torch.sub(wg, zero[..., None]).div_(scale[..., None]).round_().add_(8).clamp_(0, 15)
    scale_zero = torch.stack((scale, zero), dim=-1).transpose(0, 1)  # [ng, out, 2]
    return (codes.to(torch.uint8).view(out_features, in_features),
            scale_zero.to(torch.bfloat16))


def int4_from_blocks(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes uint8 [out, in] (0..15) with a float32 (scale, zero) per row and block of
    ``in / scale.shape[1]`` columns -> (packed uint8 [out, in / 2], scale_zero float32
    [in / group, out, 2]); ``group`` divides the block (each group repeats its block's pair)."""
    out_features, in_features = codes.shape
    repeat = in_features // scale.shape[1] // group
    pairs = torch.stack((scale, zero), dim=-1).float()  # [out, nb, 2]
    scale_zero = pairs.repeat_interleave(repeat, dim=1).transpose(0, 1)  # [ng, out, 2]
    return pack_int4(codes, int4_tiled(out_features, group)), scale_zero.contiguous()


def pack_int4(codes: torch.Tensor, tiled: bool) -> torch.Tensor:
    """codes uint8 [out, in] (0..15) -> uint8 [out, in / 2] in the tiled or rows layout."""
    n, k = codes.shape
    codes = codes.to(torch.uint8)
    if not tiled:
        return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    full = n // 64 * 64
    parts = []
    if full:
        blocks = codes[:full].view(-1, 2, 32, k)  # [nb, half, 32, k]
        packed = blocks[:, 0] | (blocks[:, 1] << 4)  # [nb, 32, k]
        parts.append(packed.transpose(1, 2).reshape(-1))  # [nb, k, 32]
    if n > full:
        pairs = codes[full:].view(-1, 2, k)  # [tail / 2, 2, k]: adjacent rows
        packed = pairs[:, 0] | (pairs[:, 1] << 4)  # [tail / 2, k]
        parts.append(packed.transpose(0, 1).reshape(-1))  # [k, tail / 2]
    return torch.cat(parts).view(n, k // 2)


def unpack_int4(packed: torch.Tensor, tiled: bool) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [out, in / 2] -> codes uint8 [out, in]."""
    n, k = packed.shape[0], packed.shape[1] * 2
    flat = packed.reshape(-1)
    low, high = flat & 15, flat >> 4
    if not tiled:
        return torch.stack((low, high), dim=-1).view(n, k)
    full = n // 64 * 64
    rows = []
    if full:
        size = full * k // 2
        lo = low[:size].view(-1, k, 32).transpose(1, 2)  # [nb, 32, k]
        hi = high[:size].view(-1, k, 32).transpose(1, 2)
        rows.append(torch.stack((lo, hi), dim=1).reshape(full, k))  # [nb, 2, 32, k]
    if n > full:
        size = full * k // 2
        lo = low[size:].view(k, -1).transpose(0, 1)  # [tail / 2, k]
        hi = high[size:].view(k, -1).transpose(0, 1)
        rows.append(torch.stack((lo, hi), dim=1).reshape(n - full, k))
    return torch.cat(rows)


def dequantize_int4(packed: torch.Tensor, scale_zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32, tiled: bool | None = None
                    ) -> torch.Tensor:
    """(packed [out, in / 2], scale_zero [ng, out, 2]) -> ``dtype`` [out, in].

    ``tiled``: the layout, when ``packed`` is a slice of rows (from a multiple of 64) of a
    larger tensor, whose layout its own row count would not tell; default: from the shape.
    """
    n, k = packed.shape[0], packed.shape[1] * 2
    groups = scale_zero.shape[0]
    tiled = int4_tiled(n, k // groups) if tiled is None else tiled
    codes = unpack_int4(packed, tiled).view(n, groups, k // groups)  # [out, ng, g]
    sz = scale_zero.to(dtype).transpose(0, 1)  # [out, ng, 2]
    w = (codes.to(dtype) - 8) * sz[..., :1] + sz[..., 1:]
    return w.view(n, k)


# -- what the running CPU's kernels want ---------------------------------------------------------


@functools.cache
def native_int4_tiled() -> bool:
    """Whether torch's CPU int4 kernel exists here and wants exactly the tiled layout.

    True on AVX-512 builds (checked by packing a probe matrix both ways and running the
    kernel once against the dequantized reference); False elsewhere (AVX2 packs 32-row blocks,
    ARM may have no such kernel): there, tiled weights are repacked for the kernel at load
    time, or computed by dequantizing (see ``edgetp.parallel.qlinear``).
    """
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    matmul = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if convert is None or matmul is None:
        return False
    with torch.device("cpu"):  # real tensors even if called while building on "meta"
        return _probe_int4_kernel(convert, matmul)


def _probe_int4_kernel(convert, matmul) -> bool:  # noqa: ANN001 - torch op handles
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(80, 64, generator=gen)  # one full 64-row block and a 16-row tail
    codes, scale_zero = int4_codes(w, 32)
    try:
        native = convert(codes.to(torch.int32), 8)
        x = torch.randn(2, 64, generator=gen).to(torch.bfloat16)
        y = matmul(x, native, 32, scale_zero).float()
    except RuntimeError:
        return False
    if native.shape != (80, 32) or not torch.equal(native, pack_int4(codes, True)):
        return False
    want = x.float() @ dequantize_int4(native, scale_zero).T
    return bool(torch.allclose(y, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())))


def native_int4_pack(packed: torch.Tensor) -> torch.Tensor:
    """Tiled codes repacked by torch's own converter (for CPUs whose layout differs)."""
    codes = unpack_int4(packed, True).to(torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
