"""edgetp.model.speculative and edgetp.model.drafting: the verification rule (greedy: the
target's own tokens; sampled: a chi-square test that the output distribution is the target's),
prompt lookup, the draft model's rollback, the tokenizer check."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence

import pytest
import torch
from helpers.tiny import tiny_model

from edgetp.config.generation import SamplingConfig
from edgetp.model.demo import DEMO_MODEL_DIR
from edgetp.model.drafting import LookupDrafter, ModelDrafter, tokenizer_mismatch
from edgetp.model.sampling import Sampler
from edgetp.model.speculative import Draft, residual, verify
from edgetp.model.tokenizer import Tokenizer

V = 3
TARGET = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.5, 0.3], [-0.5, 0.2, 1.0]])  # [prev, next]
DRAFT = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0], [0.5, 0.5, -1.0]])  # a worse guess
TOKENS = 2  # sequences of this many tokens are counted
TRIALS = 2500


def one_hot_logits(token: int, size: int = 8) -> torch.Tensor:
    out = torch.zeros(size)
    out[token] = 5.0
    return out


def test_greedy_keeps_the_agreeing_prefix_and_adds_the_targets_token() -> None:
    sampler = Sampler(SamplingConfig())
    rows = torch.stack([one_hot_logits(t) for t in (4, 5, 6, 7)])  # target says 4, 5, 6, 7
    assert verify(sampler, rows, Draft([4, 5, 6]), [1]) == [4, 5, 6, 7]  # all kept + bonus
    assert verify(sampler, rows, Draft([4, 2, 6]), [1]) == [4, 5]  # replaced at the miss
    assert verify(sampler, rows[:1], Draft([]), [1]) == [4]
    with pytest.raises(ValueError, match="rows of logits"):
        verify(sampler, rows, Draft([4]), [1])


def test_greedy_applies_the_repetition_penalty_over_the_draft_before_each_token() -> None:
    # row 1 prefers 3 by a little; 3 was drafted at row 0, so the penalty turns row 1 to 2
    rows = torch.tensor([[0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 1.0, 1.2], [0.0, 0.0, 0.0, 0.0]])
    sampler = Sampler(SamplingConfig(repetition_penalty=2.0))
    assert verify(sampler, rows, Draft([3, 3]), [0]) == [3, 2]


def test_residual_is_the_normalised_positive_part() -> None:
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2])
    assert torch.allclose(residual(p, q), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(residual(p, p), p)


class MarkovDrafter:
    """Draws k tokens from the DRAFT chain (or, deterministic, always proposes ``fixed``)."""

    def __init__(self, fixed: list[int] | None = None) -> None:
        self.fixed = fixed

    def propose(self, history: Sequence[int], k: int, sampler: Sampler) -> Draft:
        if self.fixed is not None:
            return Draft(self.fixed[:k])
        tokens, probs = [], []
        for _ in range(k):
            q = sampler.distribution(DRAFT[(list(history) + tokens)[-1]])
            tokens.append(sampler.draw(q))
            probs.append(q)
        return Draft(tokens, torch.stack(probs))


def speculative_sequence(sampler: Sampler, drafter: MarkovDrafter, k: int) -> tuple[int, ...]:
    history = [0]
    while len(history) <= TOKENS:
        draft = drafter.propose(history, k, sampler)
        rows = TARGET[[history[-1], *draft.tokens]]  # [K + 1, V]: the chain's next-token logits
        history += verify(sampler, rows, draft, history)
    return tuple(history[1:TOKENS + 1])


def target_probability(sequence: tuple[int, ...], config: SamplingConfig) -> float:
    sampler, prob, prev = Sampler(config), 1.0, 0
    for token in sequence:
        prob *= float(sampler.distribution(TARGET[prev])[token])
        prev = token
    return prob


def chi_square_p_value(counts: Counter, config: SamplingConfig) -> float:
    every = {c: TRIALS * target_probability(c, config)
             for c in itertools.product(range(V), repeat=TOKENS)}
    impossible = [c for c, e in every.items() if e == 0]
    assert not any(counts[c] for c in impossible), "a sequence the target never makes"
    cells = [(c, e) for c, e in every.items() if e > 0]
    statistic = sum((counts[c] - e) ** 2 / e for c, e in cells)
    df = torch.tensor((len(cells) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(statistic / 2, dtype=torch.float64)))


@pytest.mark.parametrize(("config", "drafter", "k"), [
    (SamplingConfig(temperature=1.0, seed=1), MarkovDrafter(), 2),
    (SamplingConfig(temperature=0.7, top_k=2, seed=2), MarkovDrafter(), 3),
    (SamplingConfig(temperature=1.0, seed=3), MarkovDrafter(fixed=[1, 1, 2]), 3),  # lookup-like
])
def test_sampled_speculation_draws_from_the_targets_distribution(
        config: SamplingConfig, drafter: MarkovDrafter, k: int) -> None:
    sampler = Sampler(config)
    counts = Counter(speculative_sequence(sampler, drafter, k) for _ in range(TRIALS))
    assert chi_square_p_value(counts, config) > 1e-3, counts


def test_the_chi_square_test_tells_the_drafts_distribution_apart() -> None:
    """The control: sequences drawn from the draft chain itself fail the same test."""
    config = SamplingConfig(temperature=1.0, seed=4)
    sampler = Sampler(config)
    counts: Counter = Counter()
    for _ in range(TRIALS):
        seq = MarkovDrafter().propose([0], TOKENS, sampler).tokens
        counts[tuple(seq)] += 1
    assert chi_square_p_value(counts, config) < 1e-6


def test_lookup_continues_the_latest_occurrence_of_the_longest_suffix() -> None:
    drafter, sampler = LookupDrafter(max_ngram=3), Sampler(SamplingConfig())
    #          0  1  2  3  4  5  6  7  8  9
    context = [5, 6, 7, 8, 9, 1, 6, 7, 2, 6, 7]  # suffix "6 7": latest earlier at 6 -> 2 6 7
    assert drafter.propose(context, 3, sampler).tokens == [2, 6, 7]
    assert drafter.propose([5, 6, 7, 8, 5, 6, 7], 2, sampler).tokens == [8, 5]  # 3-gram
    assert drafter.propose([1, 2, 3], 4, sampler).tokens == []  # nothing repeats
    assert drafter.propose([4], 4, sampler).tokens == []
    assert drafter.propose([3, 4, 3], 5, sampler).tokens == [4, 3]  # as much as follows


def test_model_drafter_rolls_back_to_the_shared_prefix() -> None:
    """A draft after a rejection equals one from a fresh cache: the rejected positions are fed
    again, not reused."""
    model, sampler = tiny_model(0), Sampler(SamplingConfig())
    drafter = ModelDrafter(model, 40)
    first = drafter.propose([1, 2, 3], 4, sampler).tokens
    assert drafter.fed == [1, 2, 3, *first[:3]]
    accepted = [1, 2, 3, first[0], (first[1] + 1) % 40]  # the second draft token was rejected
    again = drafter.propose(accepted, 4, sampler).tokens
    fresh = ModelDrafter(model, 40)
    assert fresh.propose(accepted, 4, sampler).tokens == again
    with torch.inference_mode():  # and both are the model's greedy continuation
        ids = list(accepted)
        for _ in range(4):
            ids.append(int(model(torch.tensor(ids))[-1].argmax()))
    assert again == ids[len(accepted):]


def test_model_drafter_stops_at_its_context_and_fits_the_vocabulary() -> None:
    model, sampler = tiny_model(1), Sampler(SamplingConfig())
    near_the_end = [i % 40 for i in range(62)]  # positions 0..61 of a context of 64
    assert len(ModelDrafter(model, 40).propose(near_the_end, 8, sampler).tokens) == 2
    assert ModelDrafter(model, 40).propose(near_the_end + [1, 2], 8, sampler).tokens == []
    wide = ModelDrafter(model, 48).propose([1, 2], 2, Sampler(SamplingConfig(temperature=1.0)))
    assert wide.probs is not None and wide.probs.shape == (2, 48)
    assert float(wide.probs[:, 40:].sum()) == 0.0


def test_tokenizer_mismatch_names_the_difference(tmp_path) -> None:
    import json
    import shutil

    same = Tokenizer.from_dir(DEMO_MODEL_DIR)
    assert tokenizer_mismatch(same, Tokenizer.from_dir(DEMO_MODEL_DIR)) is None
    other = tmp_path / "other"
    shutil.copytree(DEMO_MODEL_DIR, other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["count"], vocab["by"] = vocab["by"], vocab["count"]
    (other / "tokenizer.json").write_text(json.dumps(data))
    reason = tokenizer_mismatch(same, Tokenizer.from_dir(other))
    assert reason is not None and "vocabularies differ" in reason and "'by'" in reason
