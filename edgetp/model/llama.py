"""Single-device Llama-family decoder in plain torch (Llama 2/3/3.1/3.2, Mistral, Qwen2).

The model knows nothing of networks. Hidden states have no batch dimension: ``h`` is ``[T, d]``,
T positions of one sequence (a prompt's chunk, a decode step, a speculative step), or, in
``forward_rows``, the newest token of each of B sequences decoding together (a decode batch),
each with its own position and KV cache slot. Module names follow the Hugging Face
state-dict names without the ``model.`` prefix, so checkpoint tensors map one to one.

Tensor parallelism (``edgetp.parallel.linears``) rewrites the linears and the per-rank head
counts of this model; nothing here changes for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgetp.config.model import ModelConfig, RopeScaling
from edgetp.core.errors import ConfigError
from edgetp.kernels import native as kernels
from edgetp.kernels.buffers import step_buffer, step_constant
from edgetp.kernels.threads import step_threads
from edgetp.model.layer_step import LayerStep, decode_step_of


def one_float_row(x: torch.Tensor) -> bool:
    """A decode step's float32 activations (one row, no autograd): these run allocation-free,
    in buffers their module keeps from step to step (:func:`step_buffer`)."""
    return x.shape[0] == 1 and x.dtype == torch.float32 and not torch.is_grad_enabled()


def one_compute_row(x: torch.Tensor) -> bool:
    """A decode step's activations in a dtype the C decode ops compute in (float32 or
    bfloat16; one row, no autograd): the attention and the activation then run in C."""
    return (x.shape[0] == 1 and x.dtype in kernels.COMPUTE_DTYPES
            and not torch.is_grad_enabled())


@dataclass(frozen=True)
class DecodeBatch:
    """The sequences of a decode batch's rows: row i is the newest token of the sequence whose
    keys and values are in KV slot ``slots[i]``, at position ``positions[i]``."""

    slots: list[int]
    positions: list[int]


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the reference implementation; the
    output is in the weight's dtype (the compute dtype), whatever the input's (the residual
    stream is float32 in every mode, see :meth:`Transformer.embed`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, d]
        if one_float_row(x) and self.weight.dtype == torch.float32:
            return self._one_row(x)
        if x.dim() == 2 and not torch.is_grad_enabled():  # a prefill chunk: one C pass
            out = torch.empty(x.shape, dtype=self.weight.dtype)  # [T, d]
            if kernels.rmsnorm_rows(x, self.weight, self.eps, out):
                return out
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32).to(self.weight.dtype)  # rounded once, to the weight's

    def _one_row(self, x: torch.Tensor) -> torch.Tensor:  # x: [1, d] float32, kept buffers
        out = step_buffer(self, "_out", tuple(x.shape), x)  # [1, d]
        if x.is_contiguous() and kernels.rmsnorm_row(x, self.weight, self.eps, out):
            return out  # one C loop
        mean_square = step_buffer(self, "_mean_square", (1, 1), x)
        torch.matmul(x, x.T, out=mean_square)  # [1, 1]: the sum of squares
        mean_square.mul_(step_constant(self, "_inverse_dim", 1.0 / x.shape[1], x))
        mean_square.add_(step_constant(self, "_eps", self.eps, x)).rsqrt_()
        return torch.mul(x, mean_square, out=out).mul_(self.weight)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], with linear or llama3 scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type != "llama3":
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(config: ModelConfig, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [max_seq_len, head_dim], float32."""
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    positions = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [S, head_dim/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [S, head_dim]
    return angles.cos(), angles.sin()


def apply_rope_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        scratch: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` written over ``x`` [T, heads, head_dim], with ``scratch`` [T, heads,
    head_dim / 2] for the first half's old values. The tables repeat their first half, so with
    c, s that half: x1' = x1 c - x2 s and x2' = x2 c + x1 s."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :half], sin[:, None, :half]  # [T, 1, hd/2]
    x1, x2 = x[..., :half], x[..., half:]
    torch.mul(x1, s, out=scratch)
    x1.mul_(c).addcmul_(x2, s, value=-1)
    x2.mul_(c).add_(scratch)
    return x


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [T, heads, head_dim]; cos, sin: [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos = cos[:, None, :].to(x.dtype)
    sin = sin[:, None, :].to(x.dtype)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """GQA attention with a preallocated KV cache.

    ``n_heads`` and ``n_kv_heads`` are this module's own (local) head counts; ``kv_of_head``
    maps each local query head to the local KV head it reads. In the unsharded model that is
    ``head // group_size``; a tensor-parallel rank may own part of a group.
    """

    def __init__(self, config: ModelConfig, sliding_window: int | None = None) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.head_dim = hd
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.sliding_window = sliding_window
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=config.qkv_bias)
        # o_proj and down_proj may become row-parallel linears (edgetp.parallel.linears)
        self.o_proj: nn.Module = nn.Linear(self.n_heads * hd, d, bias=config.o_bias)
        self.set_head_layout(torch.arange(self.n_heads, device="cpu") // config.group_size)
        self.k_cache: torch.Tensor | None = None  # KV slot 0: [KV, S, hd]
        self.v_cache: torch.Tensor | None = None
        self.more_slots: list[tuple[torch.Tensor, torch.Tensor]] = []  # slots 1..

    def set_head_layout(self, kv_of_head: torch.Tensor) -> None:
        """Set the local query-head -> local KV-head map ([n_heads] int64)."""
        self.kv_of_head = kv_of_head.to(torch.int64)
        self.n_heads = int(kv_of_head.numel())
        self.n_kv_heads = int(kv_of_head.max().item()) + 1 if self.n_heads else 0
        group = self.n_heads // max(self.n_kv_heads, 1)
        regular = torch.arange(self.n_heads, device="cpu") // max(group, 1)
        self.uniform_groups = bool(
            self.n_heads % max(self.n_kv_heads, 1) == 0 and torch.equal(regular, self.kv_of_head)
        )

    def allocate_cache(self, max_seq_len: int, dtype: torch.dtype) -> None:
        """Slot 0's cache; the other slots' (:meth:`cache_of`) are made alike on first use."""
        shape = (self.n_kv_heads, max_seq_len, self.head_dim)  # [kv_heads, S, head_dim]
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)
        self.more_slots = []

    def cache_of(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (keys, values) cache of KV slot ``slot``, each [KV, S, hd]: one sequence's.
        Slot 0 is :attr:`k_cache`/:attr:`v_cache`; slots 1.. are allocated when first used."""
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("KV cache not allocated: call Transformer.allocate_cache first")
        if slot == 0:
            return self.k_cache, self.v_cache
        while len(self.more_slots) < slot:
            self.more_slots.append((torch.zeros_like(self.k_cache),
                                    torch.zeros_like(self.v_cache)))
        return self.more_slots[slot - 1]

    def slot_bytes(self) -> int:
        """The bytes of one slot's keys and values (0 before allocation)."""
        if self.k_cache is None:
            return 0
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    def forward(
        self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor,
        slot: int = 0, batch: DecodeBatch | None = None,
    ) -> torch.Tensor:
        """x: [T, d] normed hidden states of one sequence (KV slot ``slot``) at positions
        start_pos..; returns [T, d] (a partial sum when sharded). With ``batch``, a decode
        batch instead: row i of x is the newest token of the sequence in ``batch.slots[i]`` at
        ``batch.positions[i]`` (cos, sin: [B, hd]); the projections read each weight once for
        all rows, attention runs row by row exactly as a one-row step does."""
        # the projections and norms inside a layer carry no hooks (the window's are on the
        # attention and MLP modules, the reports' on the layer): .forward skips nn.Module's
        # call machinery, ~10 us a call cold, 7 products and 2 norms a layer
        q, k, v = self.q_proj.forward(x), self.k_proj.forward(x), self.v_proj.forward(x)
        if batch is None:  # q: [T, H*hd]; k, v: [T, KV*hd]
            return self.o_proj.forward(self._attend(q, k, v, start_pos, cos, sin, slot))
        attended = torch.empty(x.shape[0], self.n_heads * self.head_dim, dtype=q.dtype)
        for i, (row_slot, position) in enumerate(zip(batch.slots, batch.positions,
                                                     strict=True)):
            row = slice(i, i + 1)
            attended[row] = self._attend(aligned_row(q, i), aligned_row(k, i), aligned_row(v, i),
                                         position, cos[row], sin[row], row_slot)
        return self.o_proj.forward(attended)  # [B, d]

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
        cos: torch.Tensor, sin: torch.Tensor, slot: int,
    ) -> torch.Tensor:
        """One sequence's attention: q [T, H*hd], k and v [T, KV*hd] at start_pos.. -> the
        heads' outputs [T, H*hd]; k and v go into the slot's cache first."""
        k_cache, v_cache = self.cache_of(slot)
        t, hd = q.shape[0], self.head_dim
        end = start_pos + t
        natively = self._attend_natively(q, k, v, start_pos, cos, sin, (k_cache, v_cache))
        if natively is not None:
            return natively
        q, k = q.view(t, self.n_heads, hd), k.view(t, self.n_kv_heads, hd)  # [T, H|KV, hd]
        if one_float_row(q):  # the projections' outputs are this step's own: rotate in place
            rope_q = step_buffer(self, "_rope_q", (1, self.n_heads, hd // 2), q)
            rope_k = step_buffer(self, "_rope_k", (1, self.n_kv_heads, hd // 2), k)
            apply_rope_in_place(q, cos, sin, rope_q)
            apply_rope_in_place(k, cos, sin, rope_k)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache[:, start_pos:end] = k.transpose(0, 1)
        v_cache[:, start_pos:end] = v.view(t, self.n_kv_heads, hd).transpose(0, 1)
        keys = k_cache[:, :end]  # [KV, S, hd]
        values = v_cache[:, :end]  # [KV, S, hd]
        if not self.uniform_groups:
            keys = keys.index_select(0, self.kv_of_head)  # [H, S, hd]
            values = values.index_select(0, self.kv_of_head)
        mask = self._mask(start_pos, t, end)
        if t == 1 and mask is None and self.uniform_groups:
            return self._one_query(q, keys, values)
        # batched 4-D inputs: torch's CPU flash kernel takes them (a mask included); 3-D
        # ones fall to its math path, 2-7x slower on a prefill chunk
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, H, T, hd]
            keys.unsqueeze(0),  # [1, H|KV, S, hd]
            values.unsqueeze(0),
            attn_mask=mask,
            enable_gqa=self.uniform_groups and self.n_heads != self.n_kv_heads,
        )  # [1, H, T, hd]
        return out[0].transpose(0, 1).reshape(t, self.n_heads * hd)

    def _attend_natively(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         position: int, cos: torch.Tensor, sin: torch.Tensor,
                         caches: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """A decode step's RoPE, cache write and attention in one C call (q [1, H*hd], k and
        v [1, KV*hd], float32 or bfloat16 as the cache) -> [1, H*hd] in a kept buffer; None
        where it does not apply (more rows, other dtypes, irregular head groups, a sliding
        window's mask, a long context, no C library): the torch path then runs."""
        if (not one_compute_row(q) or not self.uniform_groups or caches[0].dtype != q.dtype
                or position >= self.native_positions(caches[0].shape[1])
                or not all(x.is_contiguous() for x in (q, k, v, cos, sin))):
            return None
        hd, heads, kv_heads = self.head_dim, self.n_heads, self.n_kv_heads
        out = step_buffer(self, "_native_out", (1, heads * hd), q)  # [1, H*hd]
        # [S] float32 scores whatever the compute dtype (cos is a float32 table's row)
        scratch = step_buffer(self, "_native_scores", (caches[0].shape[1],), cos)
        if not kernels.attend_one(q.view(1, heads, hd), k.view(1, kv_heads, hd), v, caches,
                                  cos, sin, position, hd**-0.5, scratch, out):
            return None
        return out

    def _one_query(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                   ) -> torch.Tensor:
        """Decode attention of one position, each KV head serving its group of query heads in
        place: the group's queries are the rows of one SDPA batch entry (SDPA's GQA path would
        copy K and V per query head). q: [1, H, hd]; keys, values: [KV, S, hd] -> [1, H * hd]."""
        kv, hd = keys.shape[0], self.head_dim
        allocation_free = one_float_row(q)  # q: [1, H, hd]
        q = q.view(kv, self.n_heads // kv, hd)  # [KV, G, hd]
        if not allocation_free:
            out = F.scaled_dot_product_attention(q, keys, values)  # [KV, G, hd]
            return out.reshape(1, self.n_heads * hd)
        group, seen = q.shape[1], keys.shape[1]
        capacity = kv * group * self.k_cache.shape[1]  # type: ignore[union-attr]
        scores = step_buffer(self, "_scores", (capacity,), q)[:kv * group * seen]
        scores = scores.view(kv, group, seen)  # [KV, G, S]
        torch.matmul(q, keys.transpose(1, 2), out=scores)
        peak = step_buffer(self, "_peak", (kv, group, 1), q)
        scores.mul_(step_constant(self, "_scale", hd**-0.5, q))
        torch.amax(scores, -1, keepdim=True, out=peak)
        scores.sub_(peak).exp_()  # softmax over the positions, in place
        torch.sum(scores, -1, keepdim=True, out=peak)
        out = step_buffer(self, "_attended", (kv, group, hd), q)
        torch.matmul(scores.div_(peak), values, out=out)  # [KV, G, hd]
        return out.view(1, self.n_heads * hd)

    def native_positions(self, cache_positions: int) -> int:
        """How many positions (from 0) a one-row step's attention runs in C for with a cache of
        ``cache_positions``: within the cache, :data:`~edgetp.kernels.native.ATTEND_MAX_POSITIONS`
        and, with a sliding window, the positions its mask leaves whole (see :meth:`_mask`). The
        one rule for the op-by-op step and the step programs (``edgetp.model.layer_step``)."""
        limit = min(kernels.ATTEND_MAX_POSITIONS, cache_positions)
        return limit if self.sliding_window is None else min(limit, self.sliding_window)

    def _mask(self, start_pos: int, t: int, end: int) -> torch.Tensor | None:
        """Boolean [T, S] mask (True = attend), or None when every key is visible."""
        window = self.sliding_window
        if t == 1 and (window is None or end <= window):
            return None
        q_pos = torch.arange(start_pos, end)[:, None]
        k_pos = torch.arange(end)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        return mask


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, inner, bias=bias)
        self.up_proj = nn.Linear(d, inner, bias=bias)
        self.down_proj: nn.Module = nn.Linear(inner, d, bias=bias)  # or a row-parallel one

    def forward(self, x: torch.Tensor, per_row: bool = False) -> torch.Tensor:
        """x: [T, d] -> [T, d]. ``per_row`` (a decode batch) and a one-row step (float32 or
        bfloat16): the activation as a decode step's program computes it
        (``kernels.silu_mul``: one scalar loop, so a row's values do not depend on the rows
        beside it); without the C library row by row in torch (silu's vector loop and its
        scalar tail compute exp differently, so on [B, inner] an element could land in the
        other one)."""
        if not per_row and not one_compute_row(x):  # gate and up are this call's own
            gated = F.silu(self.gate_proj.forward(x), inplace=True).mul_(self.up_proj.forward(x))
            return self.down_proj.forward(gated)  # gated: [T, inner]
        gate, up = self.gate_proj.forward(x), self.up_proj.forward(x)  # [B, inner] each
        if kernels.silu_mul(gate, up):  # the C loop: every element alike, the step program's
            return self.down_proj.forward(gate)
        for i in range(x.shape[0]):
            row = aligned_row(gate, i)
            F.silu(row, inplace=True)
            if row.data_ptr() != gate[i].data_ptr():
                gate[i] = row[0]
        return self.down_proj.forward(gate.mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        window = config.sliding_window if index in config.sliding_layers else None
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, window)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def decode_step(self) -> LayerStep | None:
        """The layer's float32 one-row step in C (:class:`LayerStep`), built on first use and
        again when its pieces, their tensors or its cache changed; None where some piece has
        no C form or hooks are on (:func:`decode_step_of`)."""
        return decode_step_of(self)

    def forward(
        self, h: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor,
        slot: int = 0, batch: DecodeBatch | None = None,
    ) -> torch.Tensor:  # h: [T, d], one sequence; or [B, d], a decode batch
        if batch is None and one_float_row(h):
            step = self.decode_step()
            out = None if step is None else step(self, h, start_pos, cos, sin, slot)
            if out is not None:  # the two step programs ran (edgetp.model.layer_step)
                return out
        if batch is not None:
            normed = norm_rows(self.input_layernorm, h)
            mid = h + self.self_attn(normed, 0, cos, sin, 0, batch)
            return mid + self.mlp(norm_rows(self.post_attention_layernorm, mid), True)
        attended = self.self_attn(self.input_layernorm.forward(h), start_pos, cos, sin, slot)
        if not one_float_row(h):
            h = h + attended
            return h + self.mlp(self.post_attention_layernorm.forward(h))
        mid = torch.add(h, attended, out=step_buffer(self, "_mid", tuple(h.shape), h))
        out = step_buffer(self, "_out", tuple(h.shape), h)
        return torch.add(mid, self.mlp(self.post_attention_layernorm.forward(mid)), out=out)


def batch_problem(slots: list[int], positions: list[int], rows: int) -> str | None:
    """What is wrong with a decode batch of ``rows`` rows in ``slots`` at ``positions``, or
    None: one slot and one position per row, and a slot named by several rows only at
    consecutive positions in row order (one sequence's tokens, each seeing the ones before)."""
    if len(slots) != rows or len(positions) != rows:
        return (f"a decode batch of {rows} rows needs one KV slot and one position per row, "
                f"got slots {slots} and positions {positions}")
    last: dict[int, int] = {}
    for slot, position in zip(slots, positions, strict=True):
        if slot in last and position != last[slot] + 1:
            return (f"KV slot {slot} is at position {last[slot]} and then {position} in one "
                    "step: a slot's rows must be consecutive positions")
        last[slot] = position
    return None


def norm_rows(norm: RMSNorm, h: torch.Tensor) -> torch.Tensor:
    """``norm`` of each row of h [B, d] apart, exactly as a one-row step computes it (its sum
    of squares is a dot product there, whose rounding a [B, d] reduction would not repeat)."""
    out = torch.empty(h.shape[0], h.shape[1], dtype=norm.weight.dtype)  # [B, d]
    for i in range(h.shape[0]):
        out[i] = norm(aligned_row(h, i))[0]  # may be the norm's kept buffer: copied out at once
    return out


ALIGNMENT = 64  # bytes: torch's CPU allocations start at such an address


def aligned_row(x: torch.Tensor, i: int) -> torch.Tensor:
    """Row i of x [B, n] as [1, n], at an address as aligned as a one-row step's own tensor:
    the view when it is, else a copy. torch's reductions and matmuls may peel an unaligned
    start off their vector loop, which changes the order of the sums: a row at an odd offset
    (a rank's 24 query values of 4 bytes) would not round as it does alone."""
    row = x[i : i + 1]
    return row if row.data_ptr() % ALIGNMENT == 0 else row.clone()


def _embedding(vocab_size: int, hidden_size: int) -> nn.Embedding:
    """An ``nn.Embedding``; built on the meta device (a node's skeleton, weights loaded later)
    without its random initialisation, whose ``normal_`` on meta imports torch._dynamo: two
    seconds of CPU at every node's start."""
    weight = torch.empty(vocab_size, hidden_size)  # on the current default device
    if weight.is_meta:
        return nn.Embedding(vocab_size, hidden_size, _weight=weight)
    return nn.Embedding(vocab_size, hidden_size)


class LogitsHead(nn.Linear):
    """The lm_head: x [T, d] -> logits [T, vocab] in float32 whatever the weight's dtype.

    The product runs in the compute dtype but its sums are never rounded to it: near logits of
    16-20 a bfloat16 step is 0.06-0.125, which ties the top tokens. Its quantized replacement
    (``edgetp.parallel.qlinear``) keeps ``float_output`` too.
    """

    float_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.float_linear(x, self.weight)  # [T, vocab] float32
        return y if self.bias is None else y + self.bias.float()


class Transformer(nn.Module):
    """The whole decoder. ``forward(tokens, start_pos)`` = ``head(layers(embed(tokens)))``."""

    rope_cos: torch.Tensor  # [S, head_dim] buffers, registered in __init__
    rope_sin: torch.Tensor
    window: object | None = None  # what streams the weights, if anything (set by the loader)

    def __init__(self, config: ModelConfig, max_seq_len: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.max_seq_len = max_seq_len or config.max_position_embeddings
        # an nn.Embedding, or a table read from disk row by row (edgetp.parallel.blocks)
        self.embed_tokens: nn.Module = _embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = LogitsHead(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_head_to_embedding()
        with torch.device("cpu"):  # real tables even when the weights are built on "meta"
            cos, sin = rope_tables(config, self.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)  # [S, head_dim]
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.local_layers()[0].input_layernorm.weight.dtype

    def tie_head_to_embedding(self) -> None:
        """The lm_head reads the embedding table itself (``tie_word_embeddings``)."""
        self.lm_head.weight = self.embed_tokens.get_parameter("weight")

    def local_layers(self) -> list[DecoderLayer]:
        """The layers this process holds (a worker holds none of the master's private ones)."""
        return [layer for _, layer in self.indexed_layers()]

    def indexed_layers(self) -> list[tuple[int, DecoderLayer]]:
        """(index in the whole model, layer) of every layer this process holds."""
        return [(i, layer) for i, layer in enumerate(self.layers)
                if isinstance(layer, DecoderLayer)]

    def drop_layer(self, index: int) -> None:
        """Forget layer ``index``: another node runs it (its slot stays, so indices hold)."""
        self.layers[index] = None  # type: ignore[assignment]  # ModuleList keeps None slots

    def allocate_cache(self, dtype: torch.dtype | None = None) -> None:
        """Preallocate every local layer's KV cache for ``max_seq_len`` positions: slot 0's;
        the other slots are allocated when a sequence first uses them."""
        for layer in self.local_layers():
            layer.self_attn.allocate_cache(self.max_seq_len, dtype or self.dtype)

    def cache_bytes(self) -> int:
        """The bytes of the KV cache allocated now (every slot used so far)."""
        total = 0
        for layer in self.local_layers():
            attn = layer.self_attn
            caches = [attn.k_cache, attn.v_cache, *(c for kv in attn.more_slots for c in kv)]
            total += sum(0 if c is None else c.numel() * c.element_size() for c in caches)
        return total

    def slot_bytes(self) -> int:
        """What one more KV slot costs: every local layer's keys and values for
        ``max_seq_len`` positions."""
        return sum(layer.self_attn.slot_bytes() for layer in self.local_layers())

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: [T] -> [T, d] float32
        """The residual stream starts here, in float32 in every mode: in bfloat16 compute the
        products, attention and KV cache are bfloat16 but each layer's output is added to a
        float32 stream (a bfloat16 stream, rounded at every addition, doubled the mean KL
        against float32 on SmolLM2-135M: 0.0043 against 0.0020 over 300 tokens)."""
        return self.embed_tokens(tokens).float()

    def forward_layers(
        self, h: torch.Tensor, start_pos: int, layers: range | None = None, slot: int = 0
    ) -> torch.Tensor:
        """Run decoder layers (default: all) on one sequence's h [T, d] at positions
        start_pos.., its keys and values in KV slot ``slot``; -> [T, d]."""
        end = start_pos + h.shape[0]
        self._check_context(end)
        step_threads(h.shape[0])  # torch's threads: the node's for prefill, one for decode
        cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]
        for index in layers if layers is not None else range(len(self.layers)):
            h = self.layers[index](h, start_pos, cos, sin, slot)
        return h

    def forward_rows(
        self, h: torch.Tensor, slots: list[int], positions: list[int],
        layers: range | None = None,
    ) -> torch.Tensor:
        """A decode batch through decoder layers (default: all): row i of h [B, d] is a
        token of the sequence in KV slot ``slots[i]``, at ``positions[i]`` (a slot's rows are
        consecutive positions: a speculative step's tokens). Rows run in order, each exactly
        as a one-row step of its sequence, so row i's result is bitwise that step's; -> [B, d]."""
        problem = batch_problem(slots, positions, h.shape[0])
        if problem:
            raise ValueError(problem)
        self._check_context(max(positions) + 1)
        step_threads(1)  # decode: torch's work is per row; the products use the kernels' pool
        at = torch.tensor(positions, dtype=torch.int64)
        cos, sin = self.rope_cos[at], self.rope_sin[at]  # [B, hd]
        batch = DecodeBatch(slots, positions)
        for index in layers if layers is not None else range(len(self.layers)):
            h = self.layers[index](h, 0, cos, sin, 0, batch)
        return h

    def forward_step(
        self, h: torch.Tensor, slots: list[int], starts: list[int], layers: range | None = None,
    ) -> torch.Tensor:
        """A step as the wire describes it (``edgetp.net.wire``'s ``step``): one sequence's T
        rows (one slot, one start: :meth:`forward_layers`) or a decode batch of T sequences, a
        row each (T slots and starts: :meth:`forward_rows`). h: [T, d] -> [T, d]."""
        if len(slots) == 1:
            return self.forward_layers(h, starts[0], layers, slot=slots[0])
        return self.forward_rows(h, slots, starts, layers)

    def _check_context(self, end: int) -> None:
        if end > self.max_seq_len:
            raise ConfigError(
                f"sequence of {end} tokens exceeds the context of {self.max_seq_len}; "
                "raise --max-seq-len or shorten the prompt"
            )

    def head(self, h: torch.Tensor) -> torch.Tensor:  # h: [T, d] -> logits [T, vocab] fp32
        return self.lm_head(self.norm(h))  # float32 in every mode (LogitsHead)

    def head_rows(self, h: torch.Tensor) -> torch.Tensor:  # h: [B, d] -> logits [B, vocab]
        """The head of a decode batch: each row normed as a one-row step does (norm_rows)."""
        return self.lm_head(norm_rows(self.norm, h))

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """tokens: [T] int64 -> logits [T, vocab] (float32)."""
        return self.head(self.forward_layers(self.embed(tokens), start_pos))
