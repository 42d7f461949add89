"""A decoder layer's one-row step as two C programs (edgetp.model.layer_step) gives bitwise
the op-by-op step's logits and KV cache, in float32 and in the bfloat16 compute dtype: whole
models of every family (biases, grouped heads, a sliding window that the decoding crosses),
and two ranks of float32, bfloat16, int8 and int4 splits; where a piece has no C form the
layer runs op by op."""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.hf_models import VOCAB
from helpers.parallel import RankContext, run_sharded
from torch import nn

from edgetp.kernels import native
from edgetp.kernels.step import StepProgram
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


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every step program run's outcome (True: it ran), in order."""
    outcomes: list[bool] = []
    real = StepProgram.run

    def counted(self: StepProgram, *args: Any, **kwargs: Any) -> bool:
        outcomes.append(real(self, *args, **kwargs))
        return outcomes[-1]

    monkeypatch.setattr(StepProgram, "run", counted)
    return outcomes


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
    """Each layer's step as its last decode step found it (None: none built or none)."""
    kept = [layer.__dict__.get("_decode_step") for layer in model.local_layers()]
    return [None if k is None else k.step for k in kept]


def without_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LayerStep, "build", classmethod(lambda cls, layer: None))


def caches(model: Transformer) -> list[torch.Tensor]:
    return [c for layer in model.local_layers()
            for c in (layer.self_attn.k_cache, layer.self_attn.v_cache) if c is not None]


FAMILIES = ["llama32", "qwen2", "attn_bias", "mlp_bias", "gqa1", "head_dim", "sliding"]


@pytest.mark.parametrize(("family", "dtype"),
                         [(f, torch.float32) for f in FAMILIES]
                         + [(f, torch.bfloat16) for f in ("llama32", "qwen2", "sliding")])
def test_a_whole_models_steps_are_the_op_by_op_bits(tiny_model_dir, monkeypatch, runs,
                                                    family: str, dtype: torch.dtype) -> None:
    model_dir, _ = tiny_model_dir(family)

    def run() -> tuple[list[torch.Tensor], Transformer]:
        model = on_kernels(load_model(model_dir, dtype, MAX_SEQ_LEN))
        model.allocate_cache()
        return greedy_logits(model), model

    stepped, model = run()
    assert all(step is not None for step in built_steps(model)), "no step program was built"
    layers = len(model.local_layers())
    # two programs a layer and decode step; the sliding window's 8 positions end the steps
    decoded = STEPS if family != "sliding" else 8 - len(PROMPT)
    assert runs.count(True) == 2 * layers * decoded, runs
    assert runs.count(False) == (0 if family != "sliding" else layers * (STEPS - decoded))
    with monkeypatch.context() as patch:
        without_steps(patch)
        plain, plain_model = run()
        assert all(step is None for step in built_steps(plain_model))
    assert all(torch.equal(a, b) for a, b in zip(stepped, plain, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(caches(model), caches(plain_model), strict=True))


@pytest.mark.parametrize("split", ["float32", "bfloat16", "int8", "int4"])
def test_two_ranks_steps_are_the_op_by_op_bits(tiny_model_dir, tmp_path: Path, monkeypatch,
                                               runs, split: str) -> None:
    """Each rank's halves end in its share of o and down; ``finish`` allreduces them. (Wide
    enough that every int4 slice has whole 16-row tiles and 32-column groups.) A bfloat16
    split computes in bfloat16, every other in float32."""
    model_dir, _ = tiny_model_dir("llama3", hidden_size=128, intermediate_size=256)
    dirs = split_checkpoint(model_dir, tmp_path, 2, dtype=split).rank_dirs
    compute = torch.bfloat16 if split == "bfloat16" else torch.float32

    def run() -> tuple[list[torch.Tensor], list[Transformer]]:
        group = InProcessGroup(2)
        models = [load_rank(d, group.communicator(r), compute, MAX_SEQ_LEN)
                  for r, d in enumerate(dirs)]
        return run_sharded(models, 2, greedy_logits), models

    stepped, models = run()
    assert all(step is not None for m in models for step in built_steps(m))
    layers = len(models[0].local_layers())
    assert runs == [True] * (2 * 2 * layers * STEPS)  # both ranks, every layer and step
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
    assert bf16.local_layers()[0].decode_step() is not None
    bf16.allocate_cache(torch.float32)  # a cache of another dtype than the products'
    assert bf16.local_layers()[0].decode_step() is None
    half = on_kernels(load_model(model_dir, torch.float16, MAX_SEQ_LEN))  # no C float16 ops
    half.allocate_cache()
    assert half.local_layers()[0].decode_step() is None
    unsplit_torch = load_model(model_dir, torch.float32, MAX_SEQ_LEN)  # nn.Linear: no C form
    unsplit_torch.allocate_cache()
    assert unsplit_torch.local_layers()[0].decode_step() is None


def rebind_norm(model: Transformer) -> None:
    norm = model.local_layers()[0].input_layernorm
    norm.weight.data = norm.weight.data * 1.5  # new memory under the same parameter


def rebind_bias(model: Transformer) -> None:
    proj = model.local_layers()[1].self_attn.q_proj
    proj.bias.data = proj.bias.data + 0.25


def new_parameter(model: Transformer) -> None:
    proj = model.local_layers()[0].mlp.up_proj  # as a checkpoint loader registers one
    proj.register_parameter("weight", nn.Parameter(proj.weight.detach() * 2,
                                                   requires_grad=False))


def new_module(model: Transformer) -> None:
    attn = model.local_layers()[1].self_attn
    attn.v_proj = copy.deepcopy(attn.v_proj)
    attn.v_proj.weight.data.mul_(-1)


def new_cache(model: Transformer) -> None:
    model.allocate_cache()


@pytest.mark.parametrize("change", [rebind_norm, rebind_bias, new_parameter, new_module,
                                    new_cache])
def test_a_step_follows_what_it_reads(tiny_model_dir, monkeypatch, runs,
                                      change: Callable[[Transformer], None]) -> None:
    """After a first generation, a tensor the programs read is bound anew, a parameter or a
    module replaced, or the cache made again: the next generation equals the op-by-op one of
    a model changed alike (old memory is neither read nor freed under the programs)."""
    model_dir, _ = tiny_model_dir("qwen2")  # q, k, v biases

    def changed() -> Transformer:
        model = on_kernels(load_model(model_dir, torch.float32, MAX_SEQ_LEN))
        model.allocate_cache()
        greedy_logits(model)
        change(model)  # the next generation starts over at position 0: no new cache needed
        return model

    model = changed()
    before = [step for step in built_steps(model)]
    stepped = greedy_logits(model)
    assert runs and all(runs)
    assert any(a is not b for a, b in zip(before, built_steps(model), strict=True))
    with monkeypatch.context() as patch:
        without_steps(patch)
        plain = greedy_logits(changed())
    assert all(torch.equal(a, b) for a, b in zip(stepped, plain, strict=True))


def test_hooks_put_on_after_the_first_step_are_called(tiny_model_dir) -> None:
    model_dir, _ = tiny_model_dir("llama32")
    model = on_kernels(load_model(model_dir, torch.float32, MAX_SEQ_LEN))
    model.allocate_cache()
    greedy_logits(model)
    layer = model.local_layers()[0]
    assert layer.decode_step() is not None
    calls: list[int] = []
    handle = layer.mlp.register_forward_pre_hook(lambda module, args: calls.append(1))
    model.allocate_cache()
    greedy_logits(model)
    assert len(calls) == STEPS + 1  # the prompt and every decode step: op by op
    handle.remove()
    assert layer.decode_step() is not None


def test_a_layer_lets_go_of_its_step_with_itself(tiny_model_dir) -> None:
    """No reference cycle: a model is freed when its last reference goes."""
    model_dir, _ = tiny_model_dir("llama32")
    model = on_kernels(load_model(model_dir, torch.float32, MAX_SEQ_LEN))
    model.allocate_cache()
    greedy_logits(model)
    gone = weakref.ref(model.local_layers()[0])
    gc.disable()
    try:
        del model
        assert gone() is None
    finally:
        gc.enable()
