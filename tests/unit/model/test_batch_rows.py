"""A decode batch (``Transformer.forward_rows``) gives every sequence bitwise the logits it gets
alone: sequences of different lengths in their own KV slots, joining and leaving the batch at
different steps, in float32 and bfloat16 compute."""

from __future__ import annotations

import pytest
import torch
from helpers.hf_models import VOCAB

from edgetp.model.checkpoint import load_model
from edgetp.model.llama import Transformer
from edgetp.parallel.linears import on_kernels

PROMPTS = [[5, 9, 2], [7, 1, 1, 3, 8, 2, 6], [4] * 12, [3, 14]]
JOINS = [0, 0, 2, 3]  # the batch step at which each sequence's prompt has been prefilled
STEPS = 6  # decode steps of each sequence


def alone(model: Transformer, prompt: list[int]) -> list[torch.Tensor]:
    """Greedy decoding of one sequence in slot 0, one row a step: each step's logits [V]."""
    logits = model.head(model.forward_layers(model.embed(torch.tensor(prompt)), 0)[-1:])[0]
    out, history = [logits], list(prompt)
    for _ in range(STEPS):
        history.append(int(out[-1].argmax()))
        h = model.forward_layers(model.embed(torch.tensor(history[-1:])), len(history) - 1)
        out.append(model.head(h)[0])
    return out


def batched(model: Transformer) -> list[list[torch.Tensor]]:
    """Every prompt in its own slot (slot i + 1: slot 0 stays unused), prefilled at its join
    step, then decoded in a batch with whoever is active; each sequence's logits per step."""
    out: list[list[torch.Tensor]] = [[] for _ in PROMPTS]
    histories = [list(p) for p in PROMPTS]
    for step in range(max(JOINS) + STEPS + 1):
        for i, prompt in enumerate(PROMPTS):
            if JOINS[i] == step:
                h = model.forward_layers(model.embed(torch.tensor(prompt)), 0, slot=i + 1)
                out[i].append(model.head(h[-1:])[0])
        active = [i for i in range(len(PROMPTS))
                  if JOINS[i] < step + 1 and len(out[i]) <= STEPS and out[i]]
        active = [i for i in active if JOINS[i] != step]  # joined this step: decodes next
        if not active:
            continue
        for i in active:
            histories[i].append(int(out[i][-1].argmax()))
        tokens = torch.tensor([histories[i][-1] for i in active])
        positions = [len(histories[i]) - 1 for i in active]
        h = model.forward_rows(model.embed(tokens), [i + 1 for i in active], positions)
        for row, i in enumerate(active):
            out[i].append(model.head_rows(h)[row])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_a_decode_batch_gives_each_sequence_its_logits_alone(tiny_model_dir, dtype) -> None:
    path, _ = tiny_model_dir("llama3")
    model = on_kernels(load_model(path, dtype=dtype))  # as Master.local runs it
    expected = [alone(model, prompt) for prompt in PROMPTS]
    got = batched(model)
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert len(have) == STEPS + 1
        for step, (a, b) in enumerate(zip(want, have, strict=True)):
            assert a.shape == (VOCAB,)
            assert torch.equal(a, b), f"sequence {i}, step {step}: {(a - b).abs().max():.3g}"


@torch.inference_mode()
def test_each_slot_keeps_its_own_keys(tiny_model_dir) -> None:
    path, _ = tiny_model_dir("llama3")
    model = load_model(path)
    before = model.cache_bytes()
    model.forward_layers(model.embed(torch.tensor([1, 2, 3])), 0, slot=2)
    assert model.cache_bytes() == 3 * before == 3 * model.slot_bytes()
    attn = model.local_layers()[0].self_attn
    assert torch.count_nonzero(attn.cache_of(1)[0]) == 0  # slot 1 made, never written
    assert torch.count_nonzero(attn.cache_of(2)[0][:, :3]) > 0
    with pytest.raises(ValueError, match="consecutive positions"):
        model.forward_rows(model.embed(torch.tensor([1, 2])), [1, 1], [3, 3])


@torch.inference_mode()
def test_one_sequences_rows_in_one_batch_are_its_one_row_steps(tiny_model_dir) -> None:
    """A speculative step's K + 1 tokens as a decode batch of one slot at consecutive
    positions: each row's logits are bitwise the one-row step's (each row sees the ones before
    it)."""
    path, _ = tiny_model_dir("llama3")
    model = on_kernels(load_model(path))
    prompt, tokens = [5, 9, 2, 7], [4, 11, 3, 3, 8]
    model.forward_layers(model.embed(torch.tensor(prompt)), 0)
    steps = [model.head(model.forward_layers(model.embed(torch.tensor([t])), len(prompt) + i))[0]
             for i, t in enumerate(tokens)]
    model.forward_layers(model.embed(torch.tensor(prompt)), 0, slot=3)
    positions = list(range(len(prompt), len(prompt) + len(tokens)))
    rows = model.head_rows(model.forward_rows(model.embed(torch.tensor(tokens)),
                                              [3] * len(tokens), positions))
    for i, step in enumerate(steps):
        assert torch.equal(rows[i], step), f"row {i}"
