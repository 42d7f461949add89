"""edgetp.shard.plan: apportioning, the shard plan's coverage properties, JSON, and its errors."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edgetp.config.model import ModelConfig
from edgetp.shard.plan import (
    PlanError,
    ShardPlan,
    apportion,
    layer_slices,
    make_plan,
    mlp_alignment,
    parse_shares,
)


def model_config(
    heads: int = 8,
    kv_heads: int = 2,
    intermediate: int = 96,
    head_dim: int = 8,
    **extra: object,
) -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=128,
        hidden_size=heads * head_dim,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        **extra,  # type: ignore[arg-type]
    )


share_values = st.floats(min_value=0.01, max_value=100.0, allow_nan=False, allow_infinity=False)


# --- apportion -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(total=st.integers(1, 5000), shares=st.lists(share_values, min_size=1, max_size=16))
def test_apportion_properties(total, shares):
    n = len(shares)
    assume(total >= n)
    parts = apportion(total, shares)
    assert len(parts) == n
    assert sum(parts) == total
    assert all(part >= 1 for part in parts)
    assert apportion(total, shares) == parts  # deterministic
    exact = [total * s / sum(shares) for s in shares]
    # Largest-remainder rounding never gives a part more than its exact share rounded up (or
    # the minimum of one unit)...
    for part, e in zip(parts, exact, strict=True):
        assert part < max(1.0, e) + 1 + 1e-9, (parts, exact)
    # ...and when every exact share is at least one unit no part needs the minimum, so every
    # part is within one unit of its exact proportional share.
    if min(exact) >= 1:
        for part, e in zip(parts, exact, strict=True):
            assert abs(part - e) < 1 + 1e-9, (parts, exact)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 16), per_rank=st.integers(1, 300))
def test_apportion_equal_shares_differ_by_at_most_one(n, per_rank):
    total = n * per_rank + per_rank // 3
    parts = apportion(total, [1.0] * n)
    assert sum(parts) == total and max(parts) - min(parts) <= 1
    assert parts == sorted(parts, reverse=True)  # ties go to the lower ranks


@pytest.mark.parametrize(
    "total, shares, expected",
    [
        (4, [2, 1, 1], [2, 1, 1]),
        (10, [1, 1, 1], [4, 3, 3]),
        (3, [100, 1, 1], [1, 1, 1]),  # tiny shares still get a unit, taken from the big one
        (8, [3, 1], [6, 2]),
        (7, [1], [7]),
    ],
)
def test_apportion_examples(total, shares, expected):
    assert apportion(total, shares) == expected


def test_apportion_scale_invariant_and_overflow_safe():
    assert apportion(96, [1e308, 1e308, 1e308]) == apportion(96, [1, 1, 1])
    assert apportion(96, [2e-300, 1e-300]) == apportion(96, [2, 1])


def test_apportion_too_few_units():
    with pytest.raises(PlanError, match="each of 3 nodes at least one of 2 units"):
        apportion(2, [1, 1, 1])


# --- make_plan coverage ------------------------------------------------------------------------


def check_plan(config: ModelConfig, plan: ShardPlan) -> None:
    """Every head and MLP column is owned exactly once; KV ranges are exactly what is needed."""
    n, group = plan.n_ranks, config.group_size
    assert [r.rank for r in plan.ranks] == list(range(n))
    q_end = mlp_end = 0
    for share in plan.ranks:
        # q heads: contiguous, disjoint, non-empty, in rank order
        assert share.q_heads[0] == q_end and share.n_q_heads >= 1
        q_end = share.q_heads[1]
        # MLP columns likewise, on multiples of the alignment
        assert share.mlp_columns[0] == mlp_end and share.n_mlp_columns >= 1
        assert share.mlp_columns[0] % plan.mlp_alignment == 0
        mlp_end = share.mlp_columns[1]
        # the KV heads held are exactly those the q heads read
        needed = {q // group for q in range(*share.q_heads)}
        assert set(range(*share.kv_heads)) == needed
        local = share.kv_of_head(group)
        assert len(local) == share.n_q_heads
        assert all(0 <= k < share.n_kv_heads for k in local)
        assert [k + share.kv_heads[0] for k in local] == [q // group for q in range(*share.q_heads)]
    assert q_end == config.num_attention_heads
    assert mlp_end == config.intermediate_size
    if n <= config.num_key_value_heads:  # whole groups: no KV head is stored twice
        kv = [share.kv_heads for share in plan.ranks]
        assert kv[0][0] == 0 and kv[-1][1] == config.num_key_value_heads
        assert all(a[1] == b[0] for a, b in zip(kv[:-1], kv[1:], strict=True))
        assert all(s.n_q_heads == s.n_kv_heads * group for s in plan.ranks)
    assert plan.num_attention_heads == config.num_attention_heads
    assert plan.num_key_value_heads == config.num_key_value_heads
    assert plan.intermediate_size == config.intermediate_size
    assert plan.head_dim == config.head_dim


@st.composite
def plan_requests(draw):
    kv = draw(st.integers(1, 8))
    heads = kv * draw(st.integers(1, 8))
    intermediate = draw(st.integers(1, 3000))
    n = draw(st.integers(1, min(heads, intermediate)))
    shares = draw(st.none() | st.lists(share_values, min_size=n, max_size=n))
    return model_config(heads, kv, intermediate), n, shares


@settings(max_examples=300, deadline=None)
@given(plan_requests())
def test_make_plan_covers_everything_exactly_once(request):
    config, n, shares = request
    plan = make_plan(config, n, shares)
    assert plan.n_ranks == n
    assert plan.shares == tuple(float(s) for s in (shares or [1.0] * n))
    check_plan(config, plan)


@pytest.mark.parametrize(
    "heads, kv, n",
    [(8, 2, 1), (8, 2, 2), (8, 2, 3), (8, 2, 4), (8, 2, 8), (8, 1, 3), (6, 6, 4), (12, 4, 5)],
)
def test_make_plan_examples(heads, kv, n):
    config = model_config(heads, kv)
    check_plan(config, make_plan(config, n))


def test_more_ranks_than_kv_heads_split_groups():
    config = model_config(heads=8, kv_heads=2)
    plan = make_plan(config, 4)
    assert [s.q_heads for s in plan.ranks] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [s.kv_heads for s in plan.ranks] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert all(s.kv_of_head(plan.group_size) == [0, 0] for s in plan.ranks)
    # 3 ranks over 2 KV heads: rank 1's heads straddle the two groups and it holds both
    plan = make_plan(config, 3)
    assert [s.q_heads for s in plan.ranks] == [(0, 3), (3, 6), (6, 8)]
    assert plan.ranks[1].kv_heads == (0, 2)
    assert plan.ranks[1].kv_of_head(plan.group_size) == [0, 1, 1]


def test_uneven_shares_give_rank_0_more():
    config = model_config(heads=32, kv_heads=8, intermediate=1024)
    plan = make_plan(config, 3, (2, 1, 1))
    check_plan(config, plan)
    big, *others = plan.ranks
    for other in others:
        assert big.n_q_heads > other.n_q_heads
        assert big.n_kv_heads > other.n_kv_heads
        assert big.n_mlp_columns > other.n_mlp_columns
    assert [s.n_q_heads for s in plan.ranks] == [16, 8, 8]
    assert [s.n_mlp_columns for s in plan.ranks] == [512, 256, 256]


def test_mlp_alignment():
    assert mlp_alignment(11008, 2) == 128
    assert mlp_alignment(96, 1) == 8  # 12 blocks of 8 >= 8 blocks per rank
    assert mlp_alignment(96, 8) == 1
    assert mlp_alignment(97, 2) == 1


def test_layer_slices_match_the_plan():
    config = model_config(heads=8, kv_heads=2, qkv_bias=True, o_bias=True, mlp_bias=True)
    plan = make_plan(config, 3)
    hd = config.head_dim
    for rank, share in enumerate(plan.ranks):
        slices = layer_slices(plan, rank, config)
        q = slices["self_attn.q_proj.weight"]
        assert (q.dim, q.start, q.stop) == (0, share.q_heads[0] * hd, share.q_heads[1] * hd)
        assert slices["self_attn.q_proj.bias"] == q
        k = slices["self_attn.k_proj.weight"]
        assert (k.dim, k.start, k.stop) == (0, share.kv_heads[0] * hd, share.kv_heads[1] * hd)
        o = slices["self_attn.o_proj.weight"]
        assert (o.dim, o.start, o.stop) == (1, q.start, q.stop)
        down = slices["mlp.down_proj.weight"]
        assert (down.dim, down.start, down.stop) == (1, *share.mlp_columns)
        for whole in ("self_attn.o_proj.bias", "mlp.down_proj.bias", "input_layernorm.weight"):
            assert slices[whole].dim is None


# --- JSON --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "heads, kv, intermediate, n, shares",
    [
        (8, 2, 96, 1, None),
        (8, 2, 96, 3, (2, 1, 1)),
        (8, 2, 96, 8, None),
        (32, 8, 1000, 3, (3.5, 1, 0.25)),
    ],
)
def test_json_round_trip(heads, kv, intermediate, n, shares):
    plan = make_plan(model_config(heads, kv, intermediate), n, shares)
    text = plan.to_json()
    again = ShardPlan.from_dict(json.loads(text))
    assert again == plan
    assert again.to_json() == text
    assert hash(again) == hash(plan)


def test_plan_of_another_version_is_rejected():
    data = json.loads(make_plan(model_config(), 2).to_json())
    data["version"] = 99
    with pytest.raises(PlanError, match="version 99.*split the model again"):
        ShardPlan.from_dict(data)


# --- errors ------------------------------------------------------------------------------------


def test_more_ranks_than_heads():
    with pytest.raises(PlanError) as info:
        make_plan(model_config(heads=4, kv_heads=2), 5)
    message = str(info.value)
    assert "5 nodes" in message and "4 attention heads" in message and "at most 4" in message


def test_more_ranks_than_mlp_columns():
    with pytest.raises(PlanError, match="3 nodes exceed the 2 MLP columns"):
        make_plan(model_config(heads=4, kv_heads=4, intermediate=2), 3)


def test_no_ranks():
    with pytest.raises(PlanError, match="at least 1"):
        make_plan(model_config(), 0)


@pytest.mark.parametrize("shares", [(1, 0), (2, -1), (0, 0), (1, float("nan"))])
def test_non_positive_share(shares):
    with pytest.raises(PlanError) as info:
        make_plan(model_config(), 2, shares)
    assert "must be positive" in str(info.value) and "left out of the cluster" in str(info.value)


def test_infinite_share():
    with pytest.raises(PlanError, match="finite"):
        make_plan(model_config(), 2, (math.inf, 1))


@pytest.mark.parametrize("shares", [(1,), (1, 1, 1)])
def test_wrong_number_of_shares(shares):
    with pytest.raises(PlanError, match=f"{len(shares)} shares given for 2 nodes"):
        make_plan(model_config(), 2, shares)


def test_share_of_missing_rank():
    plan = make_plan(model_config(), 2)
    with pytest.raises(PlanError, match="rank 2 does not exist in a plan of 2 ranks"):
        plan.share(2)


def test_parse_shares():
    assert parse_shares(None, 3) == (1.0, 1.0, 1.0)
    assert parse_shares("", 2) == (1.0, 1.0)
    assert parse_shares("2,1,1", 3) == (2.0, 1.0, 1.0)
    assert parse_shares(" 1.5 , 0.5", 2) == (1.5, 0.5)


@pytest.mark.parametrize("text", ["a,b", "1;2", "1,,2", "2,1,x", "1 2", ","])
def test_parse_shares_garbage(text):
    with pytest.raises(PlanError) as info:
        parse_shares(text, 2)
    message = str(info.value)
    assert repr(text) in message and "comma-separated numbers" in message and "2,1,1" in message


def test_parse_shares_wrong_count():
    with pytest.raises(PlanError, match="gives 3 values for 2 nodes"):
        parse_shares("1,2,3", 2)
