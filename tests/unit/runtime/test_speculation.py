"""edgetp.runtime.speculation with the engine: the same greedy tokens, stops and finish reasons
with and without drafts (prompt lookup, a draft model, a draft that is always wrong), K
adapting to the acceptance rate, and --draft's refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers.tiny import codec_for, tiny_model

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.core.errors import ConfigError
from edgetp.model.demo import DEMO_DRAFT_DIR, DEMO_MODEL_DIR
from edgetp.model.drafting import LookupDrafter, ModelDrafter
from edgetp.model.sampling import Sampler
from edgetp.model.speculative import Draft
from edgetp.runtime.engine import Engine, GenerationResult, LocalRunner
from edgetp.runtime.master import Master, Prompt
from edgetp.runtime.speculation import (
    MAX_REST,
    Acceptance,
    DraftLength,
    Speculation,
    StepCosts,
)

CODEC = codec_for(*[f"t{i} " for i in range(40)])
GREEDY = SamplingConfig()
PROMPT = [1, 5, 9, 3, 5, 9, 3, 5, 9, 7, 2, 5, 9]  # repeats, so lookup has something to find


class WrongDrafter:
    """Always proposes k copies of a token the target never picks next."""

    name = "wrong"

    def reset(self) -> None:
        return None

    def propose(self, context: list[int], k: int, sampler: Sampler) -> Draft:
        return Draft([(context[-1] + 17) % 40] * k)


def run(speculation: Speculation | None, gen: GenerationConfig,
        sampling: SamplingConfig = GREEDY, seed: int = 0) -> GenerationResult:
    engine = Engine(LocalRunner(tiny_model(seed)), CODEC, eos_ids=[0], speculation=speculation)
    return engine.generate(PROMPT, sampling, gen)


@pytest.mark.parametrize("drafter", ["lookup", "self", "other", "wrong"])
@pytest.mark.parametrize("gen", [GenerationConfig(max_new_tokens=30, stop_on_eos=False),
                                 GenerationConfig(max_new_tokens=30, stop_strings=("t7 ",))])
def test_greedy_tokens_are_the_same_with_any_drafter(drafter: str, gen: GenerationConfig
                                                     ) -> None:
    drafters = {"lookup": LookupDrafter(), "self": ModelDrafter(tiny_model(0), 40),
                "other": ModelDrafter(tiny_model(5), 40), "wrong": WrongDrafter()}
    plain = run(None, gen)
    fast = run(Speculation(drafters[drafter], 6), gen)
    assert fast.token_ids == plain.token_ids and fast.text == plain.text
    assert fast.finish_reason == plain.finish_reason
    assert plain.speculation is None and fast.speculation is not None
    assert len(fast.decode_ms) == len(plain.decode_ms)
    stats = fast.speculation
    if drafter == "self":  # the target drafting for itself: every draft is kept (whether
        assert stats.accepted == stats.drafted > 0  # more drafts pay is a question of time)
    if drafter == "wrong":
        assert stats.accepted == 0


def test_speculation_stops_at_the_context_and_the_token_limit() -> None:
    engine = Engine(LocalRunner(tiny_model(0)), CODEC, eos_ids=[],
                    speculation=Speculation(ModelDrafter(tiny_model(0), 40), 8))
    plain = Engine(LocalRunner(tiny_model(0)), CODEC, eos_ids=[])
    for gen in (GenerationConfig(max_new_tokens=200), GenerationConfig(max_new_tokens=7)):
        want, got = plain.generate(PROMPT, SamplingConfig(), gen), \
            engine.generate(PROMPT, SamplingConfig(), gen)
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    assert want.finish_reason == "length" and len(got.token_ids) == 7


def test_sampled_with_the_target_as_its_own_draft_keeps_every_token() -> None:
    sampling = SamplingConfig(temperature=0.8, top_p=0.9, seed=3)
    result = run(Speculation(ModelDrafter(tiny_model(0), 40), 4),
                 GenerationConfig(max_new_tokens=20, stop_on_eos=False), sampling)
    assert len(result.token_ids) == 20
    stats = result.speculation
    assert stats is not None and stats.drafted > 0
    assert stats.accepted >= 0.9 * stats.drafted  # p == q up to the rows' rounding


def costs(plain_s: float, per_draft_s: float) -> StepCosts:
    out = StepCosts()
    out.plain(plain_s)
    out.drafted(plain_s + per_draft_s, 1)
    return out


def test_draft_length_measures_a_plain_step_first() -> None:
    length = DraftLength(8, StepCosts(), Acceptance())
    assert length.next() == 0  # nothing to compare drafts against yet
    length.costs.plain(0.1)
    assert length.next() == 4


def test_draft_length_grows_where_rows_are_cheap_and_drafts_kept() -> None:
    length = DraftLength(8, costs(0.090, 0.001), Acceptance())  # a slow link: rows cost ~nothing
    for _ in range(4):
        length.update(length.next(), length.k)  # every draft kept
    assert length.next() == 8
    length.update(8, 1)
    assert length.next() == 8  # one miss: long drafts still pay where rows cost nothing
    for _ in range(6):
        length.update(length.next(), 0)  # mostly misses: shorter drafts, still drafting
    assert 1 <= length.next() < 8


def test_draft_length_rests_where_rejected_rows_cost_compute() -> None:
    length = DraftLength(8, costs(0.014, 0.010), Acceptance())  # compute-bound: each row costs
    ks = []
    for _ in range(60):
        k = length.next()
        ks.append(k)
        if k:
            length.update(k, 0)  # every draft rejected
    drafted_steps = sum(1 for k in ks if k)
    assert drafted_steps <= 6, ks  # a try now and then, each rest twice as long
    assert length.rest == MAX_REST


def test_draft_length_weighs_acceptance_against_cost() -> None:
    length = DraftLength(8, costs(0.014, 0.010), Acceptance())
    for _ in range(10):
        length.update(4, 4)  # nearly always kept: worth it even where rows cost
    assert length.best() >= 4
    length.acceptance.kept, length.acceptance.rejected = 1.0, 3.0  # a = 0.25: not worth 10 ms
    assert length.best() == 0


def test_master_refuses_a_draft_with_another_tokenizer_or_a_bad_spec(tmp_path: Path) -> None:
    master = Master.local(DEMO_MODEL_DIR, max_seq_len=64)
    with pytest.raises(ConfigError, match="neither 'lookup' nor a model directory"):
        master.use_draft(str(tmp_path))
    with pytest.raises(ConfigError, match="--draft-tokens must be in 1..64"):
        master.use_draft("lookup", 0)
    other = tmp_path / "other"
    shutil.copytree(DEMO_MODEL_DIR, other)
    (other / "tokenizer_config.json").write_text(
        (other / "tokenizer_config.json").read_text().replace('"</s>"', '"<pad>"'))
    with pytest.raises(ConfigError, match="tokenizer is not the model's.*end-of-sequence"):
        master.use_draft(str(other))
    prompt, gen = Prompt("count by 2 : 1 3 5 7 count by 2 : 1"), GenerationConfig(max_new_tokens=12)
    plain = master.generate(prompt, SamplingConfig(), gen)
    master.use_draft("lookup", 3)
    result = master.generate(prompt, SamplingConfig(), gen)
    assert result.token_ids == plain.token_ids and plain.speculation is None
    assert result.speculation is not None and result.speculation.accepted >= 1


def test_rows_logits_are_the_logits_of_every_row() -> None:
    runner = LocalRunner(tiny_model(0))
    tokens = torch.tensor(PROMPT)
    rows = runner.rows_logits(tokens, 0)
    assert rows.shape == (len(PROMPT), 40)
    torch.testing.assert_close(rows[-1], runner.logits(tokens, 0))
    with pytest.raises(ConfigError, match="rows to verify"):
        LocalRunner(tiny_model(0), prefill_chunk=4).rows_logits(tokens, 0)


def test_generate_command_drafts_and_reports_it() -> None:
    import json

    from click.testing import CliRunner

    from edgetp.cli.main import main

    args = ["generate", str(DEMO_MODEL_DIR), "--prompt", "count by 4 : 3", "--json",
            "--max-seq-len", "64"]
    plain = CliRunner().invoke(main, args)
    fast = CliRunner().invoke(main, [*args, "--draft", str(DEMO_DRAFT_DIR), "--draft-tokens", "5"])
    assert plain.exit_code == 0 and fast.exit_code == 0, fast.output
    want, got = json.loads(plain.output), json.loads(fast.output)
    assert got["token_ids"] == want["token_ids"] and "speculation" not in want
    assert got["speculation"]["accepted_tokens"] > 0
    bad = CliRunner().invoke(main, [*args, "--draft", "nonsense"])
    assert bad.exit_code != 0 and "neither 'lookup' nor a model directory" in bad.output
