"""Speculative decoding over real worker processes on loopback: the same greedy tokens with
and without drafts (prompt lookup, the demo's draft model) at 1, 2 and 3 nodes, with int8 and
int4 weights and streamed weights; a worker takes a step that rolls positions back and refuses
one that leaves a gap."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.cluster import (
    JOIN_TIMEOUT_S,
    FakeMaster,
    TrackedCluster,
    call_with_deadline,
    running_cluster,
    start_worker_process,
)

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.demo import DEMO_DRAFT_DIR, DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.runtime.engine import GenerationResult
from edgetp.runtime.master import Master, Prompt

GENERATE_DEADLINE_S = 120.0
RULE_CASES = [(3, 5), (7, 2)]
LOOKUP_PROMPT = "count by 2 : 1 3 5 7 9 11 13 count by 2 : 1"  # the prompt repeats itself
DRAFTS = {"lookup": "lookup", "model": str(DEMO_DRAFT_DIR)}


def generate(master: Master, prompt: str, draft: str | None) -> GenerationResult:
    master.use_draft(draft, 6)
    gen = GenerationConfig(max_new_tokens=40)
    return call_with_deadline(lambda: master.generate(Prompt(prompt), SamplingConfig(), gen),
                              GENERATE_DEADLINE_S, "a generation")


def assert_same_tokens_with_drafts(master: Master) -> dict[str, int]:
    """Every prompt, plain and with each drafter: the same tokens. -> tokens kept per drafter."""
    kept = dict.fromkeys(DRAFTS, 0)
    prompts = [demo_prompt(step, start) for step, start in RULE_CASES] + [LOOKUP_PROMPT]
    for prompt in prompts:
        plain = generate(master, prompt, None)
        for name, draft in DRAFTS.items():
            fast = generate(master, prompt, draft)
            assert fast.token_ids == plain.token_ids, (name, prompt, fast.text, plain.text)
            assert fast.speculation is not None
            kept[name] += fast.speculation.accepted
    for step, start in RULE_CASES:
        assert generate(master, demo_prompt(step, start), None).text.strip() == \
            expected_text(step, start)
    master.use_draft(None)
    return kept


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackedCluster]:
    with running_cluster(DEMO_MODEL_DIR, 2, tmp_path_factory.mktemp("spec-2"),
                         max_seq_len=128) as cluster:
        yield cluster


def test_two_nodes_give_the_same_tokens_with_and_without_drafts(two_nodes: TrackedCluster
                                                                ) -> None:
    assert two_nodes.master is not None
    kept = assert_same_tokens_with_drafts(two_nodes.master)
    assert kept["lookup"] > 0 and kept["model"] > 0  # the drafts did carry tokens


@pytest.mark.slow
@pytest.mark.parametrize(("nodes", "options"), [
    (1, {}), (3, {}), (2, {"weight_dtype": "int8"}), (3, {"weight_dtype": "int4"}),
    (2, {"wire_dtype": "int8", "private_layers": 1}),
])
def test_more_clusters_give_the_same_tokens_with_and_without_drafts(
        nodes: int, options: dict, tmp_path: Path) -> None:
    with running_cluster(DEMO_MODEL_DIR, nodes, tmp_path, max_seq_len=128, **options) as c:
        assert c.master is not None
        assert_same_tokens_with_drafts(c.master)


@pytest.mark.slow
def test_streamed_weights_give_the_same_tokens_with_and_without_drafts(tmp_path: Path) -> None:
    from edgetp.parallel.loader import shard_memory_needs
    from edgetp.shard.split import split_checkpoint

    probe = split_checkpoint(DEMO_MODEL_DIR, tmp_path / "probe", 2)
    budget = max(shard_memory_needs(d).minimum() for d in probe.rank_dirs)
    with running_cluster(DEMO_MODEL_DIR, 2, tmp_path / "cluster", max_seq_len=128,
                         memory_budget=budget) as c:
        assert c.master is not None
        assert_same_tokens_with_drafts(c.master)


def test_a_worker_rolls_positions_back_and_refuses_a_gap(two_nodes: TrackedCluster,
                                                         tmp_path: Path) -> None:
    hidden, layers = 96, 4  # the demo model's
    fake = FakeMaster()
    proc = start_worker_process(two_nodes.rank_dir(1), fake.address, tmp_path / "worker.log")

    def run_step(step: int, start: int, rows: int) -> torch.Tensor:
        """One step through the worker (the fake master sums by doubling); its last partial."""
        fake.send(identity, "step", {"seq": 1, "step": step, "slots": [0], "starts": [start]},
                  [torch.ones(rows, hidden)])
        for index in range(2 * layers):
            _, partial = fake.recv(10, ("partial",))
            if index < 2 * layers - 1:
                fake.send(identity, "sum", partial.fields, [partial.tensors[0] * 2])
        return partial.tensors[0]

    try:
        identity, _ = fake.recv(JOIN_TIMEOUT_S, ("hello",))
        fake.welcome(identity)
        run_step(1, 0, 5)  # a prompt of 5
        first = run_step(2, 5, 4)  # a draft of 3 at positions 5..8
        again = run_step(3, 5, 4)  # rejected: positions 5..8 again, the same rows
        torch.testing.assert_close(again, first)
        fake.send(identity, "step", {"seq": 1, "step": 4, "slots": [0], "starts": [12]},
                  [torch.ones(1, hidden)])  # nothing was written at 9..11
        _, error = fake.recv(10, ("error",))
        assert "leaves a gap after the 9 positions written in KV slot 0" in error.fields["message"]
        run_step(5, 9, 1)  # the next position is fine
        fake.send(identity, "shutdown", {})
        assert proc.wait(timeout=15) == 0
    finally:
        fake.close()


def test_sampled_speculation_runs_end_to_end(two_nodes: TrackedCluster) -> None:
    """Temperature > 0 with the draft model: the rejection rule over real workers (the demo
    model is sure of its rule, so a low temperature still follows it)."""
    master = two_nodes.master
    assert master is not None
    master.use_draft(str(DEMO_DRAFT_DIR), 6)
    sampling = SamplingConfig(temperature=0.5, top_p=0.95, seed=7)
    try:
        result = call_with_deadline(
            lambda: master.generate(Prompt(demo_prompt(3, 5)), sampling,
                                    GenerationConfig(max_new_tokens=40)),
            GENERATE_DEADLINE_S, "a sampled generation")
    finally:
        master.use_draft(None)
    assert result.text.strip() == expected_text(3, 5)
    assert result.speculation is not None and result.speculation.accepted > 0
