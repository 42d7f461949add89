"""Linears over quantized weights (formats in ``edgetp.shard.quant``), and the loader's rewrite
to them.

Which code computes ``x @ W^T`` (measured on the development CPU, see
``benchmarks/quant_kernels.py`` and docs/performance.md):

* int8, 1 to ``native.MAX_BATCH_ROWS`` (8) float32 rows (decode, a continuous batch's step)
  with the native kernels available (``edgetp.kernels.native``): ``et_matvec_i8_rows`` in C,
  x quantized to int16 per 64 columns, int8 x int16 products summed exactly; ~2x the torch
  kernel's rate below, and 60x closer to the exact product. Each weight row is read once for
  all the rows, and every row's result is bitwise its one-row product (a sequence decodes the
  same tokens alone or batched).
* int4 in the tiled layout, 1 to 8 float32 rows, wherever the native kernels are built
  (AVX-512 VNNI, AVX2, NEON, plain C): ``et_matvec_i4_rows``, the same int16 activation
  blocks, codes straight from the tiled bytes, resident or streamed alike. More float32 rows
  on a CPU whose torch int4 kernel wants another layout (or that has none): the same kernel,
  8 rows at a time.
* int8 with block scales (a GGUF's Q8_0 kept, ``edgetp.shard.quant``), 1 to 8 float32 rows:
  ``et_matvec_i8_b32_rows``, the same int16 activation blocks, each 32-column half summed
  apart and scaled by its own weight scale; more rows: the fallback. int4 with float32 scales
  takes the same paths as bfloat16 ones (the C kernel reads either).
* int8, a few rows otherwise, input width a multiple of 16:
  ``torch.ops.aten._weight_int8pack_mm`` with bfloat16 activations and scales. It is several
  times faster than a float32 or bfloat16 matrix-vector product of the same shape; with float32
  activations the same op is ~20x slower, so float32 activations are converted to bfloat16 for
  it and the result back (activations and the output of each projection are rounded to
  bfloat16: the quality figures include that). On torch 2.13 it returns garbage, or crashes,
  for other input widths: those take the fallback.
* int4 in the tiled layout, a few rows: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` with
  bfloat16 activations, straight on the bytes from disk when the CPU's kernel layout is the
  tiled one (:func:`~edgetp.shard.quant.native_int4_tiled`, true on AVX-512). Elsewhere only
  without the native kernels: resident and pinned weights are then repacked once with torch's
  converter on first use, and streamed ones use the fallback (a per-use repack costs ~100x the
  matmul).
* Otherwise (prefill chunks of at least :data:`GEMM_ROWS` / :data:`INT4_GEMM_ROWS` tokens,
  int4 in the rows layout, int8 of other widths): the fallback, dequantize then a dense
  matmul, in bfloat16 (float32 activations are converted) since that is faster; with
  ``EDGETP_QUANT_KERNELS=0`` in the activations' own dtype, the exact reference. Per-channel
  int8 scales are applied to the output rather than to the weight. The fallback widens
  :data:`WIDEN_CHUNK_ELEMENTS` weights at a time (:func:`chunked_product`), never the whole
  matrix: a 70B MLP slice widened at once would cost a memory-limited worker hundreds of MiB.

:class:`QuantColumnParallelLinear` and :class:`QuantRowParallelLinear` keep the semantics of
``edgetp.parallel.linears``: a row-parallel linear computes its partial, allreduces it in plain
sight, then adds its bias once.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgetp.core import settings
from edgetp.kernels import native as kernels
from edgetp.kernels.step import ProductKind, StepProduct, good_bias
from edgetp.model.llama import Transformer
from edgetp.parallel.blocks import BlockSpec
from edgetp.parallel.comm import Communicator
from edgetp.parallel.linears import ColumnParallelLinear, RowParallelLinear
from edgetp.shard.layout import layer_file
from edgetp.shard.manifest import Manifest, TensorEntry
from edgetp.shard.quant import (
    QUANT_DTYPES,
    SCALE_SUFFIX,
    dequantize_int4,
    dequantize_int8,
    int4_tiled,
    int8_scale_rows,
    native_int4_pack,
    native_int4_tiled,
)

KERNEL_DTYPE = torch.bfloat16
GEMM_ROWS = 16  # from this many rows on, dequantize + bf16 matmul beats the int8 kernel
INT4_GEMM_ROWS = 96  # ... and the int4 kernel (int4 dequantization, in C, costs more)
WIDEN_CHUNK_ELEMENTS = 1 << 22  # weights widened at a time by the fallback: 8 MiB of bfloat16
INT8_KERNEL_COLUMNS = 16  # _weight_int8pack_mm returns garbage (or crashes) for other widths
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def kernels_enabled() -> bool:
    """``EDGETP_QUANT_KERNELS=0`` forces the fallback everywhere (for comparisons)."""
    return settings.quant_kernels_enabled()


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                kernel: bool = True) -> torch.Tensor:
    """x [T, in] @ dequant(q int8 [out, in], scale)^T -> [T, out] in x's dtype; ``scale`` [out],
    or block scales [out, in / 32] or [2, out, in / 32] (dequantized for a dense matmul, as the
    int4 fallback; edgetp.shard.quant's formats)."""
    dtype = KERNEL_DTYPE if kernel or x.dtype == KERNEL_DTYPE else x.dtype
    if scale.dim() > 1:
        y = chunked_product(x.to(dtype), q.shape[0], lambda rows: widen_int8_blocks(
            q[rows], int8_scale_rows(scale, rows), dtype))
        return y.to(x.dtype)
    if kernel and x.shape[0] < GEMM_ROWS and q.shape[1] % INT8_KERNEL_COLUMNS == 0:
        y = torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE).contiguous(), q,
                                               scale.to(KERNEL_DTYPE))
        return y.to(x.dtype)
    y = chunked_product(x.to(dtype), q.shape[0], lambda rows: q[rows].to(dtype))  # [T, out]
    return (y * scale.to(dtype)).to(x.dtype)


def widen_int8_blocks(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
                      ) -> torch.Tensor:
    """Block-scaled int8 ``codes`` [rows, in] as ``dtype``: bfloat16 in C where the library is
    (into this thread's kept buffer), else torch's elementwise ops (a [5632, 2048] weight: ~45
    ms in torch, ~3 ms in C; rounded once instead of at each op)."""
    wide = None
    if dtype == torch.bfloat16:
        wide = kernels.int8_blocks_bfloat16(codes, scales,
                                            widening_buffer(tuple(codes.shape)))
    return dequantize_int8(codes, scales, dtype) if wide is None else wide


_widening = threading.local()


def widening_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """This thread's kept bfloat16 buffer for one widened weight chunk, as ``shape``
    (contiguous). Fresh memory for every chunk cost its page faults, as much as the widening
    itself; a chunk (at most :data:`WIDEN_CHUNK_ELEMENTS` but for one very wide row) is used up
    by its matmul before the next is widened."""
    numel = math.prod(shape)
    buffer = getattr(_widening, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _widening.buffer = torch.empty(max(numel, WIDEN_CHUNK_ELEMENTS),
                                                dtype=torch.bfloat16)
    return buffer[:numel].view(shape)


def chunked_product(x: torch.Tensor, out_features: int,
                    widen: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """x [T, in] @ W^T -> [T, out] in x's dtype, where ``widen(rows)`` gives W's ``rows`` as
    [rows, in] in x's dtype: :data:`WIDEN_CHUNK_ELEMENTS` weights at a time (multiples of 64
    rows, the tiled int4 layout's blocks), so the widened copy stays small whatever W's size."""
    step = max(64, WIDEN_CHUNK_ELEMENTS // max(x.shape[-1], 1) // 64 * 64)
    if step >= out_features:
        return F.linear(x, widen(slice(0, out_features)))
    y = torch.empty(x.shape[0], out_features, dtype=x.dtype)  # [T, out]
    for start in range(0, out_features, step):
        rows = slice(start, min(start + step, out_features))
        y[:, rows] = F.linear(x, widen(rows))
    return y


def int8_product(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, kernel: bool = True,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """What a QuantLinear computes for int8: up to ``MAX_BATCH_ROWS`` float32 rows through the
    native kernel (into ``out`` when it fits) where it can, else :func:`int8_matmul`.
    x [T, in] -> [T, out]."""
    if kernel and x.shape[0] <= kernels.MAX_BATCH_ROWS:
        y = kernels.int8_linear(x, q, scale, out)
        if y is not None:
            return y
    return int8_matmul(x, q, scale, kernel)


def int4_product(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group: int,
                 kernel_layout: bool, repacked: bool = False, kernel: bool = True,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """What a QuantLinear computes for int4: float32 rows of tiled codes through the native
    kernel where it can (up to ``MAX_BATCH_ROWS`` rows at once, into ``out`` when it fits; more
    rows that many at a time where torch has no kernel for the tiled bytes), else
    :func:`int4_matmul`."""
    rows = x.shape[0]
    if kernel and not repacked and int4_tiled(packed.shape[0], group):
        y = None
        if rows <= kernels.MAX_BATCH_ROWS:
            y = kernels.int4_linear(x, packed, scale_zero, group, out)
        elif not kernel_layout and rows < INT4_GEMM_ROWS:
            y = int4_rows(x, packed, scale_zero, group)
        if y is not None:
            return y
    return int4_matmul(x, packed, scale_zero, group, kernel_layout, repacked)


def int4_rows(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group: int
              ) -> torch.Tensor | None:
    """x [T, in] float32 -> [T, out] through the batched native kernel, ``MAX_BATCH_ROWS`` rows
    at a time. Each batch reads the weight once, yet up to a prefill chunk's 128 rows that is
    several times faster than dequantizing it (on AVX2, one row at a time: 64 rows of
    [5632, 2048] 38 ms against 250 ms)."""
    x = x.contiguous()
    y = torch.empty(x.shape[0], packed.shape[0], dtype=torch.float32)  # [T, out]
    for start in range(0, x.shape[0], kernels.MAX_BATCH_ROWS):
        rows = slice(start, start + kernels.MAX_BATCH_ROWS)
        if kernels.int4_linear(x[rows], packed, scale_zero, group, y[rows]) is None:
            return None
    return y


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor,
                group: int, kernel_layout: bool, repacked: bool = False) -> torch.Tensor:
    """x [T, in] @ dequant(packed, scale_zero)^T -> [T, out].

    ``kernel_layout``: ``packed`` is in the layout of this CPU's int4 kernel; ``repacked``: it
    is *only* that (converted by torch, not our tiled layout), so every row count uses the kernel.
    """
    if kernel_layout and (x.shape[0] < INT4_GEMM_ROWS or repacked):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE).contiguous(), packed,
                                                       group, scale_zero.to(KERNEL_DTYPE))
        return y.to(x.dtype)
    dtype = KERNEL_DTYPE if x.dtype == torch.float32 and kernels_enabled() else x.dtype
    tiled = int4_tiled(packed.shape[0], x.shape[-1] // scale_zero.shape[0])
    group = x.shape[-1] // scale_zero.shape[0]

    def widen(rows: slice) -> torch.Tensor:  # [rows, in] in dtype
        if dtype == torch.bfloat16:  # in C, transposed: [in, rows] unpacks in runs
            n, width = rows.stop - rows.start, x.shape[-1]
            wide = kernels.int4_bfloat16_transposed(packed[rows], scale_zero[:, rows], group,
                                                    tiled, widening_buffer((width, n)))
            if wide is not None:
                return wide.t()
        return dequantize_int4(packed[rows], scale_zero[:, rows], dtype, tiled)

    return chunked_product(x.to(dtype), packed.shape[0], widen).to(x.dtype)


class QuantLinear(kernels.StepOutput, nn.Module):
    """y = x @ dequant(weight, weight_scale)^T (+ bias). x: [T, in] -> [T, out].

    ``weight`` and ``weight_scale`` are parameters (integer and bfloat16) so the loader and the
    window bind them by name like any weight. ``streamed`` is set for modules whose weights the
    window swaps in per use (they are never repacked).
    """

    weight: nn.Parameter  # integer codes: int8, or two int4 per uint8
    bias: nn.Parameter | None

    def __init__(self, fmt: str, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...],
                 bias: bool) -> None:
        nn.Module.__init__(self)  # not the float parents' __init__: no float weight
        if fmt not in QUANT_DTYPES:
            raise ValueError(f"unknown quantized format {fmt!r}")
        self.fmt = fmt
        self.out_features = weight_shape[0]
        self.in_features = weight_shape[1] * (2 if fmt == "int4" else 1)
        self.group = self.in_features // scale_shape[0] if fmt == "int4" else self.in_features
        stored = torch.int8 if fmt == "int8" else torch.uint8
        self.weight = nn.Parameter(torch.empty(weight_shape, dtype=stored, device="meta"),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(
            torch.empty(scale_shape, dtype=torch.bfloat16, device="meta"), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(self.out_features, device="meta"),
                                  requires_grad=False) if bias else None)
        self.streamed = False
        self.tiled = fmt == "int4" and int4_tiled(self.out_features, self.group)
        self.native = self.tiled and native_int4_tiled()  # weight bytes are the kernel's
        self.repacked = False  # weight converted by torch for a CPU with another layout
        self.float_output = False  # the lm_head: float32 logits (see float_matmul)

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.fmt == "int4" else ""
        return (f"{self.fmt}, in_features={self.in_features}, out_features={self.out_features}"
                f"{group}, bias={self.bias is not None}")

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out] without the bias."""
        kernel = kernels_enabled()
        if self.float_output:
            return self.float_matmul(x, kernel)
        if self.fmt == "int8":
            return int8_product(x, self.weight, self.weight_scale, kernel,
                                self.output_buffer(x, self.out_features))
        if (kernel and self.tiled and not self.native and not self.streamed
                and not kernels.has_int4()):
            self.weight.data = native_int4_pack(self.weight.data)  # once, for resident weights
            self.native = self.repacked = True
        return int4_product(x, self.weight, self.weight_scale, self.group,
                            self.native and (kernel or self.repacked), self.repacked, kernel,
                            self.output_buffer(x, self.out_features))

    def float_matmul(self, x: torch.Tensor, kernel: bool) -> torch.Tensor:
        """The head's product: x [T, in] -> float32 [T, out], never rounded to bfloat16 (the
        native kernels for up to ``MAX_BATCH_ROWS`` rows, else the exact float32 product of the
        dequantized weight; a head is never repacked, so its codes stay in the layout
        :func:`dequantize_int4` reads)."""
        x = x.float()
        native = kernel and x.shape[0] <= kernels.MAX_BATCH_ROWS
        if self.fmt == "int8":
            y = kernels.int8_linear(x, self.weight, self.weight_scale) if native else None
            return int8_matmul(x, self.weight, self.weight_scale, False) if y is None else y
        y = (kernels.int4_linear(x, self.weight, self.weight_scale, self.group)
             if native and self.tiled else None)
        if y is not None:
            return y
        return chunked_product(x, self.out_features, lambda rows: dequantize_int4(
            self.weight[rows], self.weight_scale[:, rows], torch.float32, self.tiled))

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(self.matmul(x))

    def step_product(self) -> StepProduct | None:
        """Its one-row product for a decode step program (``edgetp.kernels.step``), bias
        included; None where :meth:`matmul` would not take the C kernels for a float32 row."""
        return self.quantized_step_product(self.bias)

    def quantized_step_product(self, bias: torch.Tensor | None) -> StepProduct | None:
        """The C kernel :meth:`matmul` runs on one float32 row, as a program's product."""
        codes, scale = self.weight, self.weight_scale
        if (not kernels_enabled() or self.float_output or self.streamed
                or codes.device.type != "cpu" or scale.device.type != "cpu"
                or not kernels.available() or not codes.is_contiguous()
                or not scale.is_contiguous() or not good_bias(bias, codes)):
            return None
        rows, cols = self.out_features, self.in_features
        if self.fmt == "int8":
            return _int8_step_product(codes, scale, bias, rows, cols)
        if not (self.tiled and not self.repacked and kernels.has_int4()
                and kernels.int4_pairs_fit(scale, rows, cols, self.group)):
            return None
        kind = ProductKind.I4_BF16 if scale.dtype == torch.bfloat16 else ProductKind.I4_F32
        return StepProduct(kind, codes, rows, cols, scale, None, bias, self.group)


def _int8_step_product(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       rows: int, cols: int) -> StepProduct | None:
    """int8 codes with a scale per row, per 32-column block, or a block's scale and low end
    (``kernels.int8_linear``'s three kernels)."""
    form = kernels.int8_scale_form(scale, rows, cols)
    if form == "lows":
        return StepProduct(ProductKind.I8_LOWS, codes, rows, cols, scale[0], scale[1], bias)
    kind = {"rows": ProductKind.I8, "blocks": ProductKind.I8_B32}.get(form or "")
    return None if kind is None else StepProduct(kind, codes, rows, cols, scale, bias=bias)


# nn.Linear (the column-parallel parent) declares a float Tensor weight and a bias that is never
# None; QuantLinear's (first in the method order) are a Parameter of codes and an optional bias
class QuantColumnParallelLinear(QuantLinear, ColumnParallelLinear):  # type: ignore[misc]
    """Column-parallel (or unsplit) quantized linear: no communication."""


class QuantRowParallelLinear(QuantLinear, RowParallelLinear):
    """y = allreduce(x_local @ dequant(W[:, cols])^T) + b, as :class:`RowParallelLinear`."""

    def __init__(self, fmt: str, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...],
                 bias: bool, comm: Communicator) -> None:
        super().__init__(fmt, weight_shape, scale_shape, bias)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.matmul(x))  # [T, out]

    def step_product(self) -> StepProduct | None:
        """The one-row partial product (the bias comes after the sum, in :meth:`finish`)."""
        return self.quantized_step_product(None)

    def finish(self, partial: torch.Tensor) -> torch.Tensor:
        """This rank's share [T, out] -> the output: allreduced, identical on every rank."""
        return self.add_bias(self.comm.allreduce(partial))


def is_quantized(manifest: Manifest) -> bool:
    """Whether the split's layers are quantized."""
    return manifest.dtype in QUANT_DTYPES


def head_quantized(manifest: Manifest) -> bool:
    """Whether the split's lm_head is (an int4 split's is int8 by default)."""
    return manifest.head_format in QUANT_DTYPES


def keeps_stored_dtype(name: str, tensor: torch.Tensor) -> bool:
    """Quantized codes and their scales load as stored; every float tensor is cast to compute."""
    return not tensor.is_floating_point() or name.endswith(SCALE_SUFFIX)


def quantize_skeleton(model: Transformer, manifest: Manifest, comm: Communicator) -> None:
    """Replace the float linears of a ``meta`` skeleton by quantized ones shaped as on disk."""
    if is_quantized(manifest):
        for index, layer in model.indexed_layers():
            tensors = manifest.files[layer_file(index)].tensors
            for name in PROJECTIONS:
                _replace(layer, name, manifest.dtype, tensors, comm)
    if head_quantized(manifest) and getattr(model, "lm_head", None) is not None:
        _replace(model, "lm_head", manifest.head_format,
                 manifest.files["head.safetensors"].tensors, comm)


def _replace(parent: nn.Module, name: str, fmt: str, tensors: dict[str, TensorEntry],
             comm: Communicator) -> None:
    old = parent.get_submodule(name)
    weight, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight{SCALE_SUFFIX}"]
    args = (fmt, tuple(weight.shape), tuple(scale.shape), old.bias is not None)
    new = (QuantRowParallelLinear(*args, comm) if isinstance(old, RowParallelLinear)
           else QuantColumnParallelLinear(*args))
    new.reuse_output = getattr(old, "reuse_output", False)
    new.float_output = getattr(old, "float_output", False)
    owner_name, _, attr = name.rpartition(".")
    owner = parent.get_submodule(owner_name) if owner_name else parent
    setattr(owner, attr, new)


def mark_streamed(blocks: list[BlockSpec]) -> None:
    """Flag the quantized linears of the window's streamed blocks (never repacked)."""
    for block in blocks:
        for module in block.module.modules():
            if isinstance(module, QuantLinear):
                module.streamed = True
