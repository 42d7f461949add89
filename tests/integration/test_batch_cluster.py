"""A decode batch on a real cluster gives every sequence bitwise the logits it gets alone: worker
processes on loopback, the master's runner driven directly (``batch_logits`` against
``logits``), for float32, bfloat16, int8 and int4 weights, on 2 and 3 nodes, with weights
streamed through the window and with int8 activations on the wire."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.cluster import running_cluster

from edgetp.model.demo import DEMO_MODEL_DIR

PROMPTS = [[3, 17, 5, 9], [22, 4], [8, 8, 8, 30, 2, 11, 6], [14]]
STEPS = 5
SLOTS = 4


def greedy(logits: torch.Tensor) -> int:
    return int(logits.argmax())


def alone(runner, prompt: list[int]) -> list[torch.Tensor]:
    """One sequence in slot 0, a token a step: each step's logits [V]."""
    out = [runner.logits(torch.tensor(prompt), 0)]
    history = list(prompt)
    for _ in range(STEPS):
        history.append(greedy(out[-1]))
        out.append(runner.logits(torch.tensor(history[-1:]), len(history) - 1))
    return out


def batched(runner) -> list[list[torch.Tensor]]:
    """Every prompt read into its slot, then all decoding together (the last one joining two
    steps late, so the batch grows from 3 rows to 4)."""
    out: list[list[torch.Tensor]] = [[] for _ in PROMPTS]
    histories = [list(p) for p in PROMPTS]
    late = len(PROMPTS) - 1
    for i in range(late):
        out[i].append(runner.logits(torch.tensor(PROMPTS[i]), 0, slot=i))
    for step in range(STEPS + 2):
        if step == 2:
            out[late].append(runner.logits(torch.tensor(PROMPTS[late]), 0, slot=late))
        active = [i for i in range(len(PROMPTS)) if out[i] and len(out[i]) <= STEPS]
        for i in active:
            histories[i].append(greedy(out[i][-1]))
        logits = runner.batch_logits(torch.tensor([histories[i][-1] for i in active]), active,
                                     [len(histories[i]) - 1 for i in active])
        for row, i in enumerate(active):
            out[i].append(logits[row])
    return out


def assert_batch_invariant(master) -> None:
    runner = master.runner
    assert runner.slots == SLOTS
    expected = [alone(runner, prompt) for prompt in PROMPTS]
    got = batched(runner)
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert len(have) == STEPS + 1
        for step, (a, b) in enumerate(zip(want, have, strict=True)):
            assert torch.equal(a, b), f"sequence {i}, step {step}: {(a - b).abs().max():.3g}"


@pytest.mark.parametrize(("nodes", "options"), [
    (2, {}), (2, {"weight_dtype": "int4"}),
    pytest.param(3, {"weight_dtype": "int8"}, marks=pytest.mark.slow),
    pytest.param(2, {"dtype": "bfloat16", "wire_dtype": "int8"}, marks=pytest.mark.slow),
])
def test_a_decode_batch_on_a_cluster_is_bitwise_each_sequence_alone(
        nodes: int, options: dict, tmp_path: Path) -> None:
    with running_cluster(DEMO_MODEL_DIR, nodes, tmp_path, max_seq_len=64, kv_slots=SLOTS,
                         **options) as c:
        assert_batch_invariant(c.master)


@pytest.mark.slow
def test_streamed_weights_give_the_same_batch_invariance(tmp_path: Path) -> None:
    from edgetp.parallel.loader import shard_memory_needs
    from edgetp.shard.split import split_checkpoint

    probe = split_checkpoint(DEMO_MODEL_DIR, tmp_path / "probe", 2, dtype="int8")
    budget = max(shard_memory_needs(d, max_seq_len=64, kv_slots=SLOTS).minimum()
                 for d in probe.rank_dirs)
    with running_cluster(DEMO_MODEL_DIR, 2, tmp_path / "cluster", max_seq_len=64,
                         kv_slots=SLOTS, memory_budget=budget, weight_dtype="int8") as c:
        assert c.master is not None and c.master.model.window is not None  # it streams
        assert_batch_invariant(c.master)
