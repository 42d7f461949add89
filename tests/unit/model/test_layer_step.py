"""A decoder layer's float32 one-row step as two C programs (edgetp.model.layer_step) gives
bitwise the op-by-op step's logits and KV cache: whole models of every family (biases, grouped
heads, a sliding window that the decoding crosses), and two ranks of float32, int8 and int4
splits; where a piece has no C form the layer runs op by op."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.hf_models import VOCAB
from helpers.parallel import RankContext, run_sharded

from edgetp.kernels import native
from edgetp.model.checkpoint import load_model
from edgetp.model.layer_step import LayerStep
from edgetp.model.llama import Transformer
from edgetp.net.collectives import InProcessGroup
from edgetp.parallel.linears import on_kernels
from edgetp.parallel.loader import load_rank
from edgetp.shard.split import split_checkpoint

pytestmark = pytest.mark.skipif(not native.available(), reason="no native kernels")

MAX_SEQ_LEN = 32
PROMPT = torch.randint(0, VOCAB, (5,), generator=torch.Generator().manual_seed(3)).tolist()
STEPS = 12  # decode steps: the "sliding" family's window of 8 is crossed


def greedy_logits(model: Transformer, ctx: RankContext | None = None) -> list[torch.Tensor]:
    """The prompt, then STEPS greedy one-row steps: every step's logits (rank 0's)."""
    rank = 0 if ctx is None else ctx.rank
    out: list[torch.Tensor] = []
    current, pos = torch.tensor(PROMPT), 0
    with torch.inference_mode():
        for _ in range(STEPS + 1):
            h = model.embed(current) if rank == 0 else None
            h = h if ctx is None else ctx.broadcast(h)
            h = model.forward_layers(h, pos, range(model.config.num_hidden_layers))
            token = None
            if rank == 0:
                out.append(model.head(h[-1:])[0].clone())
                token = int(out[-1].argmax())
            pos += current.numel()
            current = torch.tensor([token if ctx is None else ctx.broadcast(token)])
    return out


def built_steps(model: Transformer) -> list[LayerStep | None]:
    return [layer.__dict__.get("_decode_step", (None,))[0] for layer in model.local_layers()]


def without_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LayerStep, "build", classmethod(lambda cls, layer: None))


def caches(model: Transformer) -> list[torch.Tensor]:
    return [c for layer in model.local_layers()
            for c in (layer.self_attn.k_cache, layer.self_attn.v_cache) if c is not None]


@pytest.mark.parametrize("family", ["llama32", "qwen2", "attn_bias", "mlp_bias", "gqa1",
                                    "head_dim", "sliding"])
def test_a_whole_models_steps_are_the_op_by_op_bits(tiny_model_dir, monkeypatch,
                                                    family: str) -> None:
    model_dir, _ = tiny_model_dir(family)

    def run() -> tuple[list[torch.Tensor], Transformer]:
        model = on_kernels(load_model(model_dir, torch.float32, MAX_SEQ_LEN))
        model.allocate_cache()
        return greedy_logits(model), model

    stepped, model = run()
    assert all(step is not None for step in built_steps(model)), "no step program was built"
    with monkeypatch.context() as patch:
        without_steps(patch)
        plain, plain_model = run()
        assert all(step is None for step in built_steps(plain_model))
    assert all(torch.equal(a, b) for a, b in zip(stepped, plain, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(caches(model), caches(plain_model), strict=True))


@pytest.mark.parametrize("split", ["float32", "int8", "int4"])
def test_two_ranks_steps_are_the_op_by_op_bits(tiny_model_dir, tmp_path: Path, monkeypatch,
                                               split: str) -> None:
    """Each rank's halves end in its share of o and down; ``finish`` allreduces them. (Wide
    enough that every int4 slice has whole 16-row tiles and 32-column groups.)"""
    model_dir, _ = tiny_model_dir("llama3", hidden_size=128, intermediate_size=256)
    dirs = split_checkpoint(model_dir, tmp_path, 2, dtype=split).rank_dirs

    def run() -> tuple[list[torch.Tensor], list[Transformer]]:
        group = InProcessGroup(2)
        models = [load_rank(d, group.communicator(r), torch.float32, MAX_SEQ_LEN)
                  for r, d in enumerate(dirs)]
        return run_sharded(models, 2, greedy_logits), models

    stepped, models = run()
    assert all(step is not None for m in models for step in built_steps(m))
    with monkeypatch.context() as patch:
        without_steps(patch)
        plain, _ = run()
    assert all(torch.equal(a, b) for a, b in zip(stepped, plain, strict=True))


def test_no_step_where_a_hook_or_a_dtype_has_no_c_form(tiny_model_dir) -> None:
    model_dir, _ = tiny_model_dir("llama32")
    model = on_kernels(load_model(model_dir, torch.float32, MAX_SEQ_LEN))
    model.allocate_cache()
    first, second = model.local_layers()[:2]
    first.mlp.register_forward_pre_hook(lambda module, args: None)  # as the window's
    assert first.decode_step() is None
    assert second.decode_step() is not None
    bf16 = on_kernels(load_model(model_dir, torch.bfloat16, MAX_SEQ_LEN))
    bf16.allocate_cache()
    assert bf16.local_layers()[0].decode_step() is None
    unsplit_torch = load_model(model_dir, torch.float32, MAX_SEQ_LEN)  # nn.Linear: no C form
    unsplit_torch.allocate_cache()
    assert unsplit_torch.local_layers()[0].decode_step() is None


def test_a_step_follows_its_weights_when_they_move(tiny_model_dir) -> None:
    """Weights bound anew (as a loader or a window binds them) make the step build again,
    and the new one reads the new memory."""
    model_dir, _ = tiny_model_dir("llama32")

    def model_and_step() -> tuple[Transformer, Callable[[], list[torch.Tensor]]]:
        model = on_kernels(load_model(model_dir, torch.float32, MAX_SEQ_LEN))
        model.allocate_cache()
        return model, lambda: greedy_logits(model)

    model, logits = model_and_step()
    logits()
    layer = model.local_layers()[0]
    old = layer.decode_step()
    proj = layer.mlp.up_proj
    proj.weight.data = proj.weight.data * 2  # new memory, other values
    new = layer.decode_step()
    assert new is not None and new is not old and new.current()
    moved = [layer.self_attn.k_cache]
    model.allocate_cache()  # a new cache: built again too
    assert layer.decode_step() is not new and layer.self_attn.k_cache is not moved[0]
    expected, plain_logits = model_and_step()
    expected.local_layers()[0].mlp.up_proj.weight.data *= 2
    assert all(torch.equal(a, b) for a, b in zip(logits(), plain_logits(), strict=True))
