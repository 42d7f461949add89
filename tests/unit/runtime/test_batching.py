"""edgetp.runtime.batching: the scheduler of continuous batching, on the demo model in this
process. Each sequence gets the tokens and finish reason it gets alone from the engine; a
prompt is read one chunk per round while the others decode; a full batch refuses; a failing
callback ends its own sequence only."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.checkpoint import load_model
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt
from edgetp.model.tokenizer import Tokenizer
from edgetp.runtime.batching import BatchScheduler, Ended
from edgetp.runtime.engine import Engine, LocalRunner


class CountingRunner(LocalRunner):
    """A LocalRunner that records every step it runs: (kind, rows)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[str, int]] = []

    def prefill(self, tokens: torch.Tensor, start_pos: int, slot: int) -> None:
        self.steps.append(("chunk", tokens.numel()))
        super().prefill(tokens, start_pos, slot)

    def logits(self, tokens: torch.Tensor, start_pos: int, slot: int = 0) -> torch.Tensor:
        self.steps.append(("logits", tokens.numel()))  # a prompt's last chunk
        return super().logits(tokens, start_pos, slot)

    def batch_logits(self, tokens: torch.Tensor, slots: list[int], positions: list[int]
                     ) -> torch.Tensor:
        self.steps.append(("decode", tokens.numel()))
        return super().batch_logits(tokens, slots, positions)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(DEMO_MODEL_DIR)


@pytest.fixture
def runner() -> Iterator[CountingRunner]:
    yield CountingRunner(load_model(DEMO_MODEL_DIR), prefill_chunk=4, kv_slots=3)


def run_all(scheduler: BatchScheduler) -> list[Ended]:
    ended: list[Ended] = []
    for _ in range(1000):
        if not scheduler.active:
            return ended
        ended += scheduler.round()
    raise AssertionError("the batch never emptied")


GREEDY = SamplingConfig()


def test_each_sequence_gets_what_it_gets_alone(runner: CountingRunner,
                                               tokenizer: Tokenizer) -> None:
    cases = [(demo_prompt(1, 80), GenerationConfig(max_new_tokens=64)),
             (demo_prompt(7, 3), GenerationConfig(max_new_tokens=5)),
             (demo_prompt(2, 10), GenerationConfig(max_new_tokens=64, stop_strings=("20",)))]
    engine = Engine(runner, tokenizer, tokenizer.eos_token_ids)
    expected = [engine.generate(tokenizer.encode(p), GREEDY, gen) for p, gen in cases]
    assert [r.finish_reason for r in expected] == ["eos", "length", "stop"]
    scheduler = BatchScheduler(runner, tokenizer, tokenizer.eos_token_ids)
    streamed: list[list[str]] = [[] for _ in cases]
    sequences = [scheduler.admit(tokenizer.encode(p), GREEDY, gen, streamed[i].append)
                 for i, (p, gen) in enumerate(cases)]
    ended = {id(e.sequence): e for e in run_all(scheduler)}
    for i, (sequence, want) in enumerate(zip(sequences, expected, strict=True)):
        got = ended[id(sequence)].result
        assert got is not None
        assert (got.token_ids, got.text, got.finish_reason) == (
            want.token_ids, want.text, want.finish_reason)
        assert "".join(streamed[i]) == want.text  # streamed piece by piece, nothing held back
        assert len(got.decode_ms) == len(want.decode_ms)


def test_a_prompt_is_read_a_chunk_a_round_while_the_others_decode(
        runner: CountingRunner, tokenizer: Tokenizer) -> None:
    scheduler = BatchScheduler(runner, tokenizer, tokenizer.eos_token_ids)
    gen = GenerationConfig(max_new_tokens=40)
    scheduler.admit(tokenizer.encode(demo_prompt(1, 1)), GREEDY, gen, lambda _: None)
    while not runner.steps or runner.steps[-1][0] != "logits":
        scheduler.round()  # the first sequence has its prompt read
    long_prompt = tokenizer.encode(" ".join([demo_prompt(3, 4)] * 4))
    assert len(long_prompt) > 5 * runner.prefill_chunk
    scheduler.admit(long_prompt, GREEDY, gen, lambda _: None)
    runner.steps.clear()
    for _ in range(4):
        scheduler.round()
    # each round: one chunk of the new prompt, then the running sequence's decode step
    assert runner.steps == [("chunk", 4), ("decode", 1)] * 4
    run_all(scheduler)
    assert runner.steps[8:10] == [("chunk", 4), ("decode", 1)]
    assert ("decode", 2) in runner.steps  # once the prompt is read, both decode together


def test_a_full_batch_refuses_and_a_freed_slot_is_reused(runner: CountingRunner,
                                                         tokenizer: Tokenizer) -> None:
    scheduler = BatchScheduler(runner, tokenizer, tokenizer.eos_token_ids)
    gen = GenerationConfig(max_new_tokens=3)
    first = [scheduler.admit(tokenizer.encode(demo_prompt(2, n)), GREEDY, gen, lambda _: None)
             for n in range(3)]
    assert [s.slot for s in first] == [0, 1, 2] and scheduler.free_slots() == 0
    with pytest.raises(RuntimeError, match="all 3 KV slots are in use"):
        scheduler.admit(tokenizer.encode(demo_prompt(2, 9)), GREEDY, gen, lambda _: None)
    scheduler.drop(first[1])
    again = scheduler.admit(tokenizer.encode(demo_prompt(2, 9)), GREEDY, gen, lambda _: None)
    assert again.slot == 1
    with pytest.raises(ValueError, match="empty"):
        scheduler.admit([], GREEDY, gen, lambda _: None)


def test_a_failing_callback_ends_its_own_sequence_only(runner: CountingRunner,
                                                       tokenizer: Tokenizer) -> None:
    scheduler = BatchScheduler(runner, tokenizer, tokenizer.eos_token_ids)
    gen = GenerationConfig(max_new_tokens=6)

    def gone(_piece: str) -> None:
        raise ConnectionError("the client went away")

    broken = scheduler.admit(tokenizer.encode(demo_prompt(1, 1)), GREEDY, gen, gone)
    fine = scheduler.admit(tokenizer.encode(demo_prompt(1, 2)), GREEDY, gen, lambda _: None)
    ended = {id(e.sequence): e for e in run_all(scheduler)}
    assert isinstance(ended[id(broken)].error, ConnectionError)
    result = ended[id(fine)].result
    assert result is not None and result.text.split() == ["3", "4", "5", "6", "7", "8"]


@pytest.mark.parametrize("draft", ["lookup", "model"])
def test_sequences_that_draft_get_what_they_get_alone(draft: str, runner: CountingRunner,
                                                      tokenizer: Tokenizer) -> None:
    """A draft per sequence, its rows in its own slot within the batch's 8 rows: each greedy
    sequence gets the tokens it gets alone without speculation, and drafts were kept."""
    from edgetp.model.demo import DEMO_DRAFT_DIR
    from edgetp.runtime.speculation import Speculation, open_drafter

    spec = "lookup" if draft == "lookup" else str(DEMO_DRAFT_DIR)
    drafter = open_drafter(spec, tokenizer, runner.max_seq_len, runner.model.config.vocab_size)
    prompts = [demo_prompt(1, 3), demo_prompt(2, 40), demo_prompt(5, 5)]
    if draft == "lookup":  # lookup needs the answer's pattern in the prompt
        prompts = [f"{demo_prompt(1, 3)} 4 5 6 7 {demo_prompt(1, 3)}",
                   f"{demo_prompt(2, 40)} 42 44 46 {demo_prompt(2, 40)}", demo_prompt(5, 5)]
    gen = GenerationConfig(max_new_tokens=30)
    engine = Engine(runner, tokenizer, tokenizer.eos_token_ids)
    expected = [engine.generate(tokenizer.encode(p), GREEDY, gen).token_ids for p in prompts]
    scheduler = BatchScheduler(runner, tokenizer, tokenizer.eos_token_ids,
                               Speculation(drafter, max_tokens=4))
    sequences = [scheduler.admit(tokenizer.encode(p), GREEDY, gen, lambda _: None)
                 for p in prompts]
    runner.steps.clear()
    ended = {id(e.sequence): e for e in run_all(scheduler)}
    results = [ended[id(s)].result for s in sequences]
    assert [r.token_ids for r in results if r is not None] == expected
    stats = [r.speculation for r in results if r is not None and r.speculation is not None]
    assert len(stats) == 3 and sum(s.accepted for s in stats) > 0  # drafts were kept
    assert max(rows for kind, rows in runner.steps if kind == "decode") <= 8
    assert any(rows > len(prompts) for kind, rows in runner.steps if kind == "decode")


def test_the_batch_limit_is_the_kernels() -> None:
    from edgetp.core.limits import MAX_BATCH
    from edgetp.kernels import native

    assert MAX_BATCH == native.MAX_BATCH_ROWS
