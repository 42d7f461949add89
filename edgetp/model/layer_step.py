"""A decoder layer's one-token step in two C calls: :class:`LayerStep`.

A decode step's layer is two halves, each ending in a product whose output may need an
allreduce (the row-parallel o and down projections of a tensor-parallel rank):

- attention: norm -> q, k, v products -> RoPE, cache write, attention -> o product
- MLP: the residual (h + attention's output) -> norm -> gate, up products -> silu(gate) * up
  -> down product

Each half runs as one :class:`~edgetp.kernels.step.StepProgram` (the same C functions the
op-by-op path calls, so the same bits); between them the layer's own linears finish their
products (``finish``: the allreduce of a row-parallel rank, nothing for a whole linear) and
the last residual addition is one C call. A layer gets a step only when every piece has its C
form: norms, cache and every product's activations in one compute dtype (float32, or
bfloat16: then the products, attention and cache are bfloat16 and the residual stream stays
float32, as op by op), uniform head groups, linears that describe their product
(``step_product``) and no hooks on the attention or MLP modules (the window's, which swap
weights in per use). Otherwise, and for a position the C attention does not take, the layer
runs op by op as before.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import nn

from edgetp.kernels import native
from edgetp.kernels.step import (
    AttentionShape,
    StepProduct,
    StepProgram,
    add_op,
    attend_op,
    norm_op,
    product_op,
    silu_mul_op,
)

if TYPE_CHECKING:
    from edgetp.model.llama import DecoderLayer


class SteppedLinear(Protocol):
    """A linear that can run inside a step program (``edgetp.parallel``'s decode linears)."""

    def step_product(self) -> StepProduct | None: ...

    def finish(self, y: torch.Tensor) -> torch.Tensor: ...


def _products(modules: list[nn.Module]) -> list[StepProduct] | None:
    found = []
    for module in modules:
        describe = getattr(module, "step_product", None)
        product = describe() if describe is not None and hasattr(module, "finish") else None
        if product is None:
            return None
        found.append(product)
    return found


def hooked(layer: DecoderLayer) -> bool:
    """Whether the layer's attention or MLP has hooks (the window's swap weights in per use)."""
    modules = layer._modules  # the dicts themselves: nn.Module's __getattr__ costs microseconds
    return any(m is not None and (m._forward_pre_hooks or m._forward_hooks)
               for m in (modules["self_attn"], modules["mlp"]))


def _pieces(layer: DecoderLayer) -> tuple[nn.Module | None, ...]:
    """The modules whose tensors the programs read: the two norms and seven linears."""
    modules = layer._modules
    attn, mlp = modules["self_attn"]._modules, modules["mlp"]._modules  # type: ignore[union-attr]
    return (modules["input_layernorm"], attn["q_proj"], attn["k_proj"], attn["v_proj"],
            attn["o_proj"], modules["post_attention_layernorm"], mlp.get("gate_proj"),
            mlp.get("up_proj"), mlp.get("down_proj"))


HELD = ("weight", "bias", "weight_scale")  # a piece's tensors a program may point at


def _signature(layer: DecoderLayer) -> tuple[tuple[nn.Module | None, ...], list[int | None]]:
    """The pieces and where each of their tensors is now: a step (or the lack of one) stays
    right while this does not change (a loader, a test or a converter may bind new memory,
    register a new parameter or put in another module). Read from the modules' own dicts:
    this runs for every layer at every decode step."""
    pieces = _pieces(layer)
    return pieces, [None if (t := m._parameters.get(name)) is None else t.data_ptr()
                    for m in pieces if m is not None for name in HELD]


def _buffer(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with torch.inference_mode(False):  # usable in and out of inference mode
        return torch.empty(shape, dtype=dtype)


@dataclass(frozen=True)
class _Kept:
    """A layer's step (or None) with what it was built for."""

    step: LayerStep | None
    cache: Callable[[], torch.Tensor | None]  # a weak reference to slot 0's keys
    signature: tuple[tuple[nn.Module | None, ...], list[int | None]]


def decode_step_of(layer: DecoderLayer) -> LayerStep | None:
    """The layer's one-row step, built on first use and again when its pieces, their tensors
    or its cache changed; None where some piece has no C form or hooks are on."""
    if hooked(layer):
        return None
    kept: _Kept | None = layer.__dict__.get("_decode_step")
    cache, signature = layer.self_attn.k_cache, _signature(layer)
    if kept is not None and kept.cache() is cache and kept.signature == signature:
        return kept.step
    step = LayerStep.build(layer)
    reference = weakref.ref(cache) if cache is not None else (lambda: None)
    layer.__dict__["_decode_step"] = _Kept(step, reference, signature)
    return step


class LayerStep:
    """A layer's two step programs, with the buffers they write (their own). It keeps no
    reference to the layer (the layer keeps it)."""

    def __init__(self, layer: DecoderLayer, products: list[StepProduct], limit: int) -> None:
        attn = layer.self_attn
        q, k, v, o, gate, up, down = products
        d, inner = o.rows, gate.rows
        self.width = d
        self.compute = compute = q.activation  # the products', norms' and cache's dtype
        self.capacity = attn.k_cache.shape[1]  # type: ignore[union-attr]
        shape = AttentionShape(attn.n_heads, attn.n_kv_heads, attn.head_dim, self.capacity,
                               limit)

        def row(width: int) -> torch.Tensor:  # [1, width], an activation of the compute dtype
            return _buffer(1, width, dtype=compute)

        # attention half: x [1, d] -> normed [1, d] -> q [1, H*hd], k, v [1, KV*hd]
        # -> attended [1, H*hd] -> partial [1, d]; x float32, the others of the compute dtype
        normed, qo, ko, vo = row(d), row(q.rows), row(k.rows), row(v.rows)
        attended, scores, partial = row(q.rows), _buffer(self.capacity), row(d)
        norm_w = layer.input_layernorm.weight.detach()  # its memory, whatever is bound later
        self.attention = StepProgram(
            [norm_op(None, norm_w, normed, layer.input_layernorm.eps), product_op(q, normed, qo),
             product_op(k, normed, ko), product_op(v, normed, vo),
             attend_op(qo, ko, vo, scores, attended, shape), product_op(o, attended, partial)],
            [normed, qo, ko, vo, attended, scores, partial, norm_w,
             *(t for p in products[:4] for t in p.tensors())])
        self.attention_partial = partial
        # MLP half: h, attended [1, d] -> mid [1, d] -> normed [1, d] -> gate, up [1, inner]
        # -> partial [1, d]; h, mid and out float32 (the residual stream), the others of the
        # compute dtype
        self.mid, self.out = _buffer(1, d), _buffer(1, d)
        normed2, gated, upped, partial2 = row(d), row(inner), row(inner), row(d)
        norm2_w = layer.post_attention_layernorm.weight.detach()
        self.mlp = StepProgram(
            [add_op(None, None, self.mid, compute),
             norm_op(self.mid, norm2_w, normed2, layer.post_attention_layernorm.eps),
             product_op(gate, normed2, gated), product_op(up, normed2, upped),
             silu_mul_op(gated, upped), product_op(down, gated, partial2)],
            [self.mid, normed2, gated, upped, partial2, norm2_w,
             *(t for p in products[4:] for t in p.tensors())])
        self.mlp_partial = partial2

    @classmethod
    def build(cls, layer: DecoderLayer) -> LayerStep | None:
        """The layer's step, or None when some piece has no C form (see the module's doc)."""
        attn = layer.self_attn
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        pieces = _pieces(layer)
        compute = norms[0].dtype  # a norm's output is in its weight's dtype
        if (not native.available() or hooked(layer) or any(p is None for p in pieces)
                or not attn.uniform_groups or attn.k_cache is None
                or compute not in native.COMPUTE_DTYPES or attn.k_cache.dtype != compute
                or any(w.dtype != compute or not w.is_contiguous() for w in norms)):
            return None
        linears = [p for p in (*pieces[1:5], *pieces[6:]) if p is not None]
        products = _products(linears)
        if (products is None or any(p.activation != compute for p in products)
                or not shapes_agree(layer, products)):
            return None
        return cls(layer, products, attn.native_positions(attn.k_cache.shape[1]))

    def __call__(self, layer: DecoderLayer, h: torch.Tensor, position: int, cos: torch.Tensor,
                 sin: torch.Tensor, slot: int) -> torch.Tensor | None:
        """One float32 row h [1, d] (the residual stream) through ``layer`` (the one it was
        built for) -> float32 [1, d] (a buffer of this step's); None before any allreduce
        when the C attention does not take ``position`` or a product failed part way (the
        layer then runs op by op, writing the same cache entries again)."""
        attn, mlp = layer.self_attn, layer.mlp
        caches = attn.cache_of(slot)
        if not (h.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
                and self.attention.run(h, position, caches, cos, sin)):
            return None
        attended = cast(SteppedLinear, attn.o_proj).finish(self.attention_partial)  # [1, d]
        if (attended.dtype == self.compute and attended.is_contiguous()
                and attended.numel() == self.width and self.mlp.run(h, second=attended)):
            ffn = cast(SteppedLinear, mlp.down_proj).finish(self.mlp_partial)  # mid came first
        else:  # an op failed part way (no memory): the module computes it as usual
            native.add_rows(h, attended, self.mid)
            ffn = mlp(layer.post_attention_layernorm(self.mid))
        return native.add_rows(self.mid, ffn, self.out)


def shapes_agree(layer: DecoderLayer, products: list[StepProduct]) -> bool:
    """Whether the products chain as the programs read them (the C ops trust the shapes):
    every input is the norm's width d, q is the heads', k and v the KV heads', o and down
    give back d, gate and up feed down."""
    attn = layer.self_attn
    q, k, v, o, gate, up, down = products
    d, hd = layer.input_layernorm.weight.numel(), attn.head_dim
    return (layer.post_attention_layernorm.weight.numel() == d
            and all(p.cols == d for p in (q, k, v, gate, up))
            and q.rows == attn.n_heads * hd and k.rows == v.rows == attn.n_kv_heads * hd
            and o.cols == q.rows and o.rows == d and gate.rows == up.rows == down.cols
            and down.rows == d)
