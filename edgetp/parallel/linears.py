"""The tensor-parallel rewrite: turns the single-device model into one rank's share.

q/k/v and gate/up become :class:`ColumnParallelLinear` (a rank computes some output features),
o_proj and down_proj become :class:`RowParallelLinear` (a rank consumes some input features and
produces a partial sum, which is allreduced in plain sight in its ``forward``). Which slices a
rank owns comes from the :class:`~edgetp.shard.plan.ShardPlan` and nowhere else.

``shard_model`` works on a loaded model (slicing its weights) and on a ``meta`` model (creating
empty local shapes that the loader fills from a rank's shard directory).
"""

from __future__ import annotations

import torch
from torch import nn

from edgetp.kernels import native as kernels
from edgetp.kernels.step import StepProduct, float_product
from edgetp.model.llama import DecoderLayer, Transformer
from edgetp.parallel.comm import Communicator
from edgetp.shard.plan import ShardPlan, TensorSlice, layer_slices


class ColumnParallelLinear(kernels.StepOutput, nn.Linear):
    """y_local = x @ W[rows]^T (+ b[rows]); no communication. x: [T, in] -> [T, out_local].

    Also the unsplit linears of rank 0's private layers, for the decode kernels.
    """

    @classmethod
    def from_tensors(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> ColumnParallelLinear:
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)  # [out_local, in]
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)  # [out_local]
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.linear(x, self.weight, self.output_buffer(x, self.out_features))  # [T, out]
        return y if self.bias is None else y + self.bias

    def step_product(self) -> StepProduct | None:
        """Its one-row product for a decode step program (``edgetp.kernels.step``), bias
        included; None when the C loops would not take it."""
        return float_product(self.weight, self.bias)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The output of :meth:`step_product`'s result: already whole. y: [1, out]."""
        return y


class RowParallelLinear(kernels.StepOutput, nn.Module):
    """y = allreduce(x_local @ W[:, cols]^T) + b.   x_local: [T, in_local] -> y: [T, out].

    The bias is added after the sum, so every rank adds it exactly once to the full result.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, comm: Communicator):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in_local]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # [out]
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffer = self.output_buffer(x, self.weight.shape[0])
        return self.finish(kernels.linear(x, self.weight, buffer))  # [T, out]

    def step_product(self) -> StepProduct | None:
        """Its one-row partial product for a decode step program (the bias comes after the
        sum, in :meth:`finish`); None when the C loops would not take it."""
        return float_product(self.weight, None)

    def finish(self, partial: torch.Tensor) -> torch.Tensor:
        """This rank's share [T, out] -> the output: allreduced, identical on every rank."""
        total = self.comm.allreduce(partial)  # [T, out]
        return total if self.bias is None else total + self.bias


def take(tensor: torch.Tensor, part: TensorSlice) -> torch.Tensor:
    """This rank's part of a full tensor (a copy, so the full tensor can be freed)."""
    if part.dim is None:
        return tensor.detach().clone()
    return tensor.detach().narrow(part.dim, part.start, part.stop - part.start).clone()


def shard_layer(
    layer: DecoderLayer, slices: dict[str, TensorSlice], kv_of_head: list[int], comm: Communicator
) -> None:
    """Replace one decoder layer's linears by this rank's parallel ones."""
    params = dict(layer.named_parameters())
    local = {name: take(params[name], part) for name, part in slices.items()}
    attn, mlp = layer.self_attn, layer.mlp

    def column(prefix: str) -> ColumnParallelLinear:
        weight, bias = local[prefix + ".weight"], local.get(prefix + ".bias")
        return ColumnParallelLinear.from_tensors(weight, bias)

    def row(prefix: str) -> RowParallelLinear:
        return RowParallelLinear(local[prefix + ".weight"], local.get(prefix + ".bias"), comm)

    q, k, v = (column(f"self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj"))
    o = row("self_attn.o_proj")
    gate, up, down = column("mlp.gate_proj"), column("mlp.up_proj"), row("mlp.down_proj")
    for linear in (q, k, v, o, gate, up, down):
        linear.reuse_output = True  # consumed within the step: its buffer serves the next
    attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj = q, k, v, o
    attn.set_head_layout(torch.tensor(kv_of_head, dtype=torch.int64, device="cpu"))
    attn.k_cache = attn.v_cache = None
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate, up, down


def unsplit(linear: nn.Linear, reuse_output: bool) -> ColumnParallelLinear:
    """A rank-0 linear kept whole, as a ColumnParallelLinear (the decode kernels' path)."""
    whole = ColumnParallelLinear.from_tensors(linear.weight, linear.bias)
    whole.reuse_output = reuse_output
    return whole


def keep_whole(layer: DecoderLayer) -> None:
    """A private layer's linears, unsplit but on the decode kernels' path."""
    attn, mlp = layer.self_attn, layer.mlp
    attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj = (
        unsplit(getattr(attn, p), True) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = (
        unsplit(getattr(mlp, p), True) for p in ("gate_proj", "up_proj", "down_proj"))


def on_kernels(model: Transformer) -> Transformer:
    """A whole (single-device) model's linears on the decode kernels' path, as a cluster's:
    one row and a decode batch's rows then go through the same C products, so a sequence gets
    bitwise the same logits alone and batched (``nn.Linear`` would give a [1, d] and a [B, d]
    product different roundings)."""
    for layer in model.local_layers():
        keep_whole(layer)
    return model


def shard_model(model: Transformer, plan: ShardPlan, rank: int, comm: Communicator) -> Transformer:
    """Rewrite ``model`` in place into rank ``rank``'s share and return it.

    Works on a loaded model and on one built on the ``meta`` device (whose local shapes the
    loader then fills). Rank 0 keeps the embedding, the final norm, the lm_head and the private
    layers whole; other ranks drop them. Allocate the KV cache afterwards
    (``model.allocate_cache()``).
    """
    if comm.world_size != plan.n_ranks:
        raise ValueError(f"communicator of {comm.world_size} ranks for a {plan.n_ranks}-rank plan")
    slices = layer_slices(plan, rank, model.config)
    kv_of_head = plan.share(rank).kv_of_head(plan.group_size)
    for index, layer in model.indexed_layers():
        if not plan.is_private(index):
            shard_layer(layer, slices, kv_of_head, comm)
        elif rank == 0:
            keep_whole(layer)
        else:
            model.drop_layer(index)  # private layers run on the master only
    if rank != 0:  # rank 0 keeps its LogitsHead: float32 logits, through the C kernels
        model.embed_tokens = None  # type: ignore[assignment]
        model.lm_head = None  # type: ignore[assignment]
        model.norm = None  # type: ignore[assignment]
    return model
