"""edgetp.model.sampling: greedy, seeded draws, top-k / top-p / repetition penalty (against
transformers)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.core.errors import ConfigError
from edgetp.model.sampling import (
    Sampler,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
)

V = 50
NEG_INF = float("-inf")


def random_logits(seed: int, n: int = V, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def draws(config: SamplingConfig, logits: torch.Tensor, n: int, previous=()) -> list[int]:
    sampler = Sampler(config)
    return [sampler(logits, previous) for _ in range(n)]


def support(logits_filtered: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits_filtered).nonzero().flatten().tolist())


KNOWN_PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


# --- greedy and seeds ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed):
    logits = random_logits(seed)
    sampler = Sampler(SamplingConfig(temperature=0.0))
    assert sampler(logits) == int(logits.argmax())
    # Greedy ignores top-k / top-p and draws nothing from the generator.
    filtered = Sampler(SamplingConfig(temperature=0.0, top_k=3, top_p=0.1, seed=seed))
    assert [filtered(logits) for _ in range(5)] == [int(logits.argmax())] * 5


def test_sampler_does_not_modify_logits():
    logits = random_logits(0)
    copy = logits.clone()
    config = SamplingConfig(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3, seed=0)
    Sampler(config)(logits, [1, 2, 3])
    assert torch.equal(logits, copy)


def test_fixed_seed_reproduces_draws_and_seeds_differ():
    logits = random_logits(1, scale=0.5)  # flat enough that draws vary
    config = SamplingConfig(temperature=1.0, seed=1234)
    first = draws(config, logits, 40)
    assert draws(config, logits, 40) == first
    assert len(set(first)) > 5
    assert draws(SamplingConfig(temperature=1.0, seed=1235), logits, 40) != first
    # Unseeded samplers are seeded from entropy: two of them disagree.
    unseeded = SamplingConfig(temperature=1.0)
    assert draws(unseeded, logits, 40) != draws(unseeded, logits, 40)


def test_seeded_draw_is_multinomial_of_tempered_softmax():
    logits = random_logits(2)
    temperature = 0.7
    expected_gen = torch.Generator().manual_seed(99)
    probs = (logits / temperature).softmax(-1)
    expected = [int(torch.multinomial(probs, 1, generator=expected_gen)) for _ in range(20)]
    assert draws(SamplingConfig(temperature=temperature, seed=99), logits, 20) == expected


@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0, 3.0, 100.0])
def test_top_k_one_equals_greedy_at_any_temperature(temperature):
    for seed in range(5):
        logits = random_logits(seed)
        config = SamplingConfig(temperature=temperature, top_k=1, seed=seed)
        assert draws(config, logits, 10) == [int(logits.argmax())] * 10


def test_temperature_sharpens_and_flattens():
    logits = random_logits(3, scale=1.0)
    cold = Counter(draws(SamplingConfig(temperature=0.05, seed=0), logits, 300))
    hot = Counter(draws(SamplingConfig(temperature=5.0, seed=0), logits, 300))
    top = int(logits.argmax())
    assert cold[top] > hot[top] and len(hot) > 3 * len(cold)


# --- top-k ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5, 17])
def test_top_k_keeps_exactly_k_candidates(k):
    # Close logits so every kept token is drawn often; distinct so there are no ties.
    logits = torch.randperm(V, generator=torch.Generator().manual_seed(k)).float() * 0.02
    expected = set(torch.topk(logits, k).indices.tolist())
    assert support(apply_top_k(logits, k)) == expected
    seen = set(draws(SamplingConfig(temperature=1.0, top_k=k, seed=k), logits, 60 * k))
    assert seen == expected


def test_top_k_zero_or_at_least_vocab_keeps_all():
    logits = random_logits(4)
    for k in (0, V, V + 10):
        assert torch.equal(apply_top_k(logits, k), logits)


# --- top-p ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "expected"),
    [(0.5, {0}), (0.3, {0}), (0.79, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (0.95, {0, 1, 2})],
)
def test_top_p_keeps_smallest_nucleus(p, expected):
    # Shuffle so the filter must sort: token i of the permuted vector has probability probs[i].
    order = torch.tensor([2, 0, 3, 1])
    logits = KNOWN_PROBS.log()[order]
    kept = {int(order[i]) for i in support(apply_top_p(logits, p))}
    assert kept == expected
    sampled = draws(SamplingConfig(temperature=1.0, top_p=p, seed=0), logits, 400)
    assert {int(order[i]) for i in set(sampled)} == expected


def test_top_p_renormalises_the_nucleus():
    logits = KNOWN_PROBS.log()
    counts = Counter(draws(SamplingConfig(temperature=1.0, top_p=0.8, seed=0), logits, 2000))
    assert set(counts) == {0, 1}
    assert abs(counts[0] / 2000 - 0.5 / 0.8) < 0.05


def test_top_p_one_keeps_all_and_always_keeps_the_top_token():
    logits = random_logits(5)
    assert torch.equal(apply_top_p(logits, 1.0), logits)
    peaked = torch.tensor([10.0, 0.0, 0.0, 0.0])
    assert support(apply_top_p(peaked, 1e-6)) == {0}


# --- repetition penalty ---------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 0.5, -0.5, 3.0, 0.0])
    out = apply_repetition_penalty(logits, [0, 1, 1, 5, 0], 2.0)
    assert torch.equal(out, torch.tensor([1.0, -4.0, 0.5, -0.5, 3.0, 0.0]))
    assert torch.equal(logits, torch.tensor([2.0, -2.0, 0.5, -0.5, 3.0, 0.0]))  # not in place


def test_repetition_penalty_identity_at_one_and_without_history():
    logits = random_logits(6)
    assert torch.equal(apply_repetition_penalty(logits, [1, 2, 3], 1.0), logits)
    assert torch.equal(apply_repetition_penalty(logits, [], 1.7), logits)


def test_repetition_penalty_applies_before_greedy():
    logits = torch.tensor([3.0, 2.0, -1.0])
    assert Sampler(SamplingConfig())(logits, [0]) == 0
    assert Sampler(SamplingConfig(repetition_penalty=2.0))(logits, [0]) == 1  # 3/2 < 2


# --- against transformers' logits processors -----------------------------------------------------


@pytest.fixture(scope="module")
def hf_processors():
    return pytest.importorskip("transformers.generation.logits_process")


def assert_same_filter(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert torch.equal(ours[finite], ref[finite])


@pytest.mark.parametrize("seed", range(20))
def test_filters_match_transformers(hf_processors, seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 200, (1,), generator=gen))
    logits = torch.randn(n, generator=gen) * float(torch.rand(1, generator=gen) * 5 + 0.1)
    no_ids = torch.zeros(1, 0, dtype=torch.int64)
    for k in {1, 2, n // 3 + 1, n - 1, n}:
        ref = hf_processors.TopKLogitsWarper(k)(no_ids, logits[None])[0]
        assert_same_filter(apply_top_k(logits, k), ref)
    for p in (0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99, float(torch.rand(1, generator=gen))):
        p = max(p, 1e-3)
        ref = hf_processors.TopPLogitsWarper(p)(no_ids, logits[None])[0]
        assert_same_filter(apply_top_p(logits, p), ref)
    previous = torch.randint(0, n, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen)
    for penalty in (0.5, 1.0, 1.3, 2.0):
        processor = hf_processors.RepetitionPenaltyLogitsProcessor(penalty)
        ref = processor(previous[None], logits[None].clone())[0]
        assert_same_filter(apply_repetition_penalty(logits, previous.tolist(), penalty), ref)


# --- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.1},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": -0.5},
        {"top_p": 1.5},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.0},
        {"seed": 2**64},
        {"seed": -(2**63) - 1},
    ],
    ids=lambda bad: "-".join(f"{k}={v}" for k, v in bad.items()),
)
def test_sampling_config_rejects_bad_values(bad):
    (key,) = bad
    with pytest.raises(ConfigError, match=key):
        SamplingConfig(**bad)


def test_sampling_config_accepts_edges():
    SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    SamplingConfig(temperature=2.0, top_k=1, top_p=1e-6, repetition_penalty=0.5, seed=0)


def test_generation_config_rejects_zero_new_tokens():
    with pytest.raises(ConfigError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)


@pytest.mark.parametrize("temperature", [1e-300, 2.4e-129, 1e-40])
def test_a_tiny_temperature_draws_the_top_token_instead_of_failing(temperature):
    logits = torch.tensor([1.0, 3.0, -2.0, 2.5])
    scaled = apply_temperature(logits, temperature)
    assert torch.isfinite(scaled.max())
    assert torch.allclose(scaled.softmax(-1), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    sampler = Sampler(SamplingConfig(temperature=temperature, seed=3))
    assert [sampler(logits) for _ in range(5)] == [1] * 5
