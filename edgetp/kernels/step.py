"""A decode step's layer half as one C call: programs of operations (``csrc/step.c``).

Between two allreduces, a layer's one-token step is a fixed run of small work: a norm, a few
matrix-vector products, attention or the activation, in float32 or in the bfloat16 compute
dtype (bfloat16 activations and cache, float32 residual stream). Op by op from Python each
costs its checks and its ctypes call; :class:`StepProgram` describes the run once (an array of C
structs whose pointers are the program's own buffers and the layer's weights) and runs it
with one call, GIL released. Every op calls the same C function the op-by-op path does (the
bias and residual additions are plain float adds, torch.add's bits), so a program gives
bitwise the op-by-op results. The layer that builds its programs is
``edgetp.model.layer_step``; each linear describes its own product (:class:`StepProduct`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch

from edgetp.kernels import native

POINTERS, SIZES = 9, 6  # STEP_POINTERS, STEP_SIZES in csrc/step.c


class StepOp(ctypes.Structure):
    """One operation of a program (``et_step_op``); fields by code in ``csrc/step.c``."""

    _fields_ = [("code", ctypes.c_int64), ("kind", ctypes.c_int64),
                ("p", ctypes.c_void_p * POINTERS), ("n", ctypes.c_int64 * SIZES),
                ("f", ctypes.c_double)]


class Code(IntEnum):
    NORM = 1
    PRODUCT = 2
    ATTEND = 3
    SILU_MUL = 4
    ADD = 5


class ProductKind(IntEnum):
    """A product's weight format (``enum step_kind`` in ``csrc/step.c``)."""

    F32 = 0  # float32 [rows, cols]
    I8 = 1  # int8 codes, one bfloat16 scale a row
    I8_B32 = 2  # int8 codes, a float16 scale per row and 32 columns
    I8_LOWS = 3  # I8_B32 plus a float16 low end per block
    I4_BF16 = 4  # int4 tiled codes, bfloat16 (scale, zero) pairs per group
    I4_F32 = 5  # ... float32 pairs
    BF16 = 6  # bfloat16 [rows, cols], bfloat16 x, y and bias (the bfloat16 compute dtype)


# an op's kind for bfloat16 arrays (NORM, ATTEND, SILU_MUL, ADD's second input), as in csrc/step.c
BF16_KIND = 1


def dtype_kind(dtype: torch.dtype) -> int:
    """An op's kind for arrays of ``dtype``: 0 float32, BF16_KIND bfloat16."""
    if dtype not in native.COMPUTE_DTYPES:
        raise ValueError(f"a step program computes in float32 or bfloat16, not {dtype}")
    return BF16_KIND if dtype == torch.bfloat16 else 0


@dataclass(frozen=True)
class StepProduct:
    """A linear's one-row product as a program runs it: x [cols] -> y [rows] (+ bias).

    The tensors are the linear's own (contiguous, in CPU memory: whoever builds it checks),
    held as detached views, so their memory outlives a parameter bound anew; ``scale`` and
    ``low`` as the format's C kernel reads them, ``group`` int4's."""

    kind: ProductKind
    weight: torch.Tensor
    rows: int
    cols: int
    scale: torch.Tensor | None = None
    low: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # [rows] in the activations' dtype, added to the product
    group: int = 0

    def __post_init__(self) -> None:
        for name in ("weight", "scale", "low", "bias"):
            tensor = getattr(self, name)
            if tensor is not None:  # the memory, not the parameter that names it now
                object.__setattr__(self, name, tensor.detach())

    def tensors(self) -> list[torch.Tensor]:
        """What a program must keep alive while it points at this product's memory."""
        return [t for t in (self.weight, self.scale, self.low, self.bias) if t is not None]

    @property
    def activation(self) -> torch.dtype:
        """The dtype of x and y: bfloat16 for a bfloat16 weight, float32 for every other."""
        return torch.bfloat16 if self.kind == ProductKind.BF16 else torch.float32


def float_product(weight: torch.Tensor, bias: torch.Tensor | None) -> StepProduct | None:
    """A float32 or bfloat16 linear's product (its activations in the weight's dtype), or None
    when the C loops would not take it."""
    if not (weight.dtype in native.COMPUTE_DTYPES and weight.dim() == 2
            and weight.is_contiguous() and weight.device.type == "cpu" and not weight.is_meta
            and good_bias(bias, weight)):
        return None
    kind = ProductKind.F32 if weight.dtype == torch.float32 else ProductKind.BF16
    return StepProduct(kind, weight, weight.shape[0], weight.shape[1], bias=bias)


def good_bias(bias: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """None, or a [rows] contiguous bias of the weight's dtype a program can add in C (a
    quantized weight's: float32)."""
    dtype = weight.dtype if weight.dtype in native.COMPUTE_DTYPES else torch.float32
    return bias is None or (bias.dtype == dtype and bias.is_contiguous()
                            and bias.device.type == "cpu"
                            and tuple(bias.shape) == (weight.shape[0],))


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _op(code: Code, pointers: Sequence[int | None], sizes: Sequence[int], f: float = 0.0,
        kind: int = 0) -> StepOp:
    op = StepOp()
    op.code, op.kind, op.f = int(code), kind, f
    for i, pointer in enumerate(pointers):
        op.p[i] = pointer
    for i, size in enumerate(sizes):
        op.n[i] = size
    return op


def norm_op(x: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor, eps: float
            ) -> StepOp:
    """out [1, d] = RMSNorm(float32 x [1, d]) with ``weight`` [d], ``out`` in the weight's
    dtype (float32 or bfloat16, :func:`native.rmsnorm_rows`'s bits); x None: the run's input."""
    if out.dtype != weight.dtype:
        raise ValueError(f"a norm's output is in its weight's dtype ({weight.dtype}), "
                         f"not {out.dtype}")
    return _op(Code.NORM, [_address(x), weight.data_ptr(), out.data_ptr()], [out.numel()], eps,
               dtype_kind(weight.dtype))


def product_op(product: StepProduct, x: torch.Tensor | None, out: torch.Tensor) -> StepOp:
    """out [1, rows] = x [1, cols] @ W^T (+ bias); x None: the run's input."""
    pointers = [_address(x), product.weight.data_ptr(), _address(product.scale),
                _address(product.low), out.data_ptr(), _address(product.bias)]
    return _op(Code.PRODUCT, pointers, [product.rows, product.cols, product.group],
               kind=int(product.kind))


@dataclass(frozen=True)
class AttentionShape:
    """A rank's heads as the C attention reads them: query head h reads KV head h // group."""

    heads: int
    kv_heads: int
    head_dim: int
    capacity: int  # positions of a KV slot's cache
    limit: int  # positions the op takes (a run at another is refused, nothing done)


def attend_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor,
              out: torch.Tensor, shape: AttentionShape) -> StepOp:
    """RoPE on q [1, H*hd] and k [1, KV*hd] in place, k and v into the run's caches at its
    position, attention over positions 0..position into out [1, H*hd]; ``scores`` holds
    ``shape.capacity`` floats."""
    pointers = [q.data_ptr(), k.data_ptr(), v.data_ptr(), scores.data_ptr(), out.data_ptr()]
    sizes = [shape.heads, shape.kv_heads, shape.head_dim, shape.capacity, shape.limit]
    return _op(Code.ATTEND, pointers, sizes, shape.head_dim**-0.5, dtype_kind(q.dtype))


def add_op(a: torch.Tensor | None, b: torch.Tensor | None, out: torch.Tensor,
           b_dtype: torch.dtype = torch.float32) -> StepOp:
    """out = a + b [1, n] (:func:`native.add_rows`'s bits): float32 ``a`` and ``out``, ``b``
    float32 or bfloat16 (``b_dtype``, b's own when given); a None: the run's input, b None:
    its second input."""
    kind = dtype_kind(b.dtype if b is not None else b_dtype)
    return _op(Code.ADD, [_address(a), _address(b), out.data_ptr()], [out.numel()], kind=kind)


def silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> StepOp:
    """gate = silu(gate) * up, [1, n] each, float32 or bfloat16 (:func:`native.silu_mul`'s
    code)."""
    return _op(Code.SILU_MUL, [gate.data_ptr(), up.data_ptr()], [gate.numel()],
               kind=dtype_kind(gate.dtype))


class StepProgram:
    """Ops run in order by one C call; keeps alive every tensor they point at."""

    def __init__(self, ops: Sequence[StepOp], keep: Sequence[torch.Tensor]) -> None:
        self._ops = (StepOp * len(ops))(*ops)
        self._address = ctypes.addressof(self._ops)
        self._count = len(ops)
        self._keep = list(keep)

    def run(self, x: torch.Tensor, position: int = 0,
            caches: tuple[torch.Tensor, torch.Tensor] | None = None,
            cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
            second: torch.Tensor | None = None) -> bool:
        """Run on the input row ``x`` (contiguous, in the dtype its first op reads: float32 for
        a layer's programs; and a ``second`` for an add's) at ``position`` (an attention op's
        KV slot ``caches``, and the position's ``cos`` and ``sin`` rows [1, hd], contiguous).
        False when the library is gone, an attention op refused the position (nothing done)
        or an op failed part way: the caller then computes the half its usual way."""
        lib = native.library()
        if lib is None:
            return False
        k_cache, v_cache = caches if caches is not None else (None, None)
        status = lib.et_step_run(self._address, self._count, x.data_ptr(),
                                 _address(second), position, _address(k_cache), _address(v_cache),
                                 _address(cos), _address(sin))
        return int(status) == 0
