"""A decoder layer's float32 one-token step in two C calls: :class:`LayerStep`.

A decode step's layer is two halves, each ending in a product whose output may need an
allreduce (the row-parallel o and down projections of a tensor-parallel rank):

- attention: norm -> q, k, v products -> RoPE, cache write, attention -> o product
- MLP: the residual (h + attention's output) -> norm -> gate, up products -> silu(gate) * up
  -> down product

Each half runs as one :class:`~edgetp.kernels.step.StepProgram` (the same C functions the
op-by-op path calls, so the same bits); between them the layer's own linears finish their
products (``finish``: the allreduce of a row-parallel rank, nothing for a whole linear) and
the last residual addition is one C call. A layer gets a step only when every piece has its C
form: float32 norms and cache, uniform head groups, linears that describe their product
(``step_product``) and no hooks on the attention or MLP modules (the window's, which swap
weights in per use). Otherwise, and for a position the C attention does not take, the layer
runs op by op as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

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
    from edgetp.model.llama import Attention, DecoderLayer


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


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks)


def _buffer(*shape: int) -> torch.Tensor:
    with torch.inference_mode(False):  # usable in and out of inference mode
        return torch.empty(shape, dtype=torch.float32)


class LayerStep:
    """A layer's two step programs, with the buffers they write (their own)."""

    def __init__(self, layer: DecoderLayer, stepped: list[nn.Module], products: list[StepProduct],
                 limit: int) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v, o, gate, up, down = products
        d, inner = o.rows, gate.rows
        self.layer = layer
        self.o_proj: SteppedLinear = attn.o_proj  # type: ignore[assignment]
        self.down_proj: SteppedLinear = mlp.down_proj  # type: ignore[assignment]
        self.capacity = attn.k_cache.shape[1]  # type: ignore[union-attr]
        shape = AttentionShape(attn.n_heads, attn.n_kv_heads, attn.head_dim, self.capacity,
                               limit)
        # attention half: x [1, d] -> normed [1, d] -> q [1, H*hd], k, v [1, KV*hd]
        # -> attended [1, H*hd] -> partial [1, d]
        normed, qo, ko, vo = _buffer(1, d), _buffer(1, q.rows), _buffer(1, k.rows), _buffer(
            1, v.rows)
        attended, scores, partial = _buffer(1, q.rows), _buffer(self.capacity), _buffer(1, d)
        norm = layer.input_layernorm
        self.attention = StepProgram(
            [norm_op(None, norm.weight, normed, norm.eps), product_op(q, normed, qo),
             product_op(k, normed, ko), product_op(v, normed, vo),
             attend_op(qo, ko, vo, scores, attended, shape), product_op(o, attended, partial)],
            [normed, qo, ko, vo, attended, scores, partial, norm.weight,
             *(t for p in products[:4] for t in p.tensors())])
        self.attention_partial = partial
        # MLP half: h, attended [1, d] -> mid [1, d] -> normed [1, d] -> gate, up [1, inner]
        # -> partial [1, d]
        self.mid, self.out = _buffer(1, d), _buffer(1, d)
        normed2, gated, upped, partial2 = _buffer(1, d), _buffer(1, inner), _buffer(1, inner), \
            _buffer(1, d)
        norm2 = layer.post_attention_layernorm
        self.mlp = StepProgram(
            [add_op(None, None, self.mid), norm_op(self.mid, norm2.weight, normed2, norm2.eps),
             product_op(gate, normed2, gated),
             product_op(up, normed2, upped), silu_mul_op(gated, upped),
             product_op(down, gated, partial2)],
            [self.mid, normed2, gated, upped, partial2, norm2.weight,
             *(t for p in products[4:] for t in p.tensors())])
        self.mlp_partial = partial2
        # what a loader would bind anew
        self.parameters = [m.get_parameter("weight") for m in stepped]
        self.pointers = [p.weight.data_ptr() for p in products]

    @classmethod
    def build(cls, layer: DecoderLayer) -> LayerStep | None:
        """The layer's step, or None when some piece has no C form (see the module's doc)."""
        attn, mlp = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if (not native.available() or _hooked(attn) or _hooked(mlp)
                or not attn.uniform_groups or attn.k_cache is None
                or attn.k_cache.dtype != torch.float32
                or any(w.dtype != torch.float32 or not w.is_contiguous() for w in norms)
                or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj"))):
            return None
        stepped = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                   mlp.up_proj, mlp.down_proj]
        products = _products(stepped)
        if products is None:
            return None
        return cls(layer, stepped, products, attention_limit(attn))

    def current(self) -> bool:
        """Whether the layer's weights are still where the programs point (a loader or a test
        may bind new memory to a parameter; the programs keep the old memory alive)."""
        return [w.data_ptr() for w in self.parameters] == self.pointers

    def __call__(self, h: torch.Tensor, position: int, cos: torch.Tensor, sin: torch.Tensor,
                 slot: int) -> torch.Tensor | None:
        """One float32 row h [1, d] through the layer -> [1, d] (a buffer of this step's);
        None, with nothing done, when the C attention does not take ``position``."""
        caches = self.layer.self_attn.cache_of(slot)
        if not (h.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
                and self.attention.run(h, position, caches, cos, sin)):
            return None
        attended = self.o_proj.finish(self.attention_partial)  # [1, d]
        if self.mlp.run(h, second=attended):  # mid = h + attended first
            ffn = self.down_proj.finish(self.mlp_partial)  # [1, d]
        else:  # an op failed part way (no memory): the module computes it as usual
            native.add_rows(h, attended, self.mid)
            ffn = self.layer.mlp(self.layer.post_attention_layernorm(self.mid))
        return native.add_rows(self.mid, ffn, self.out)


def attention_limit(attn: Attention) -> int:
    """Positions the C attention takes for this module: within the cache and
    :data:`~edgetp.kernels.native.ATTEND_MAX_POSITIONS`, and where a sliding window masks
    nothing yet."""
    limit = min(native.ATTEND_MAX_POSITIONS, attn.k_cache.shape[1])  # type: ignore[union-attr]
    return limit if attn.sliding_window is None else min(limit, attn.sliding_window)
