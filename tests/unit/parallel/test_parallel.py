"""edgetp.parallel.linears: N sharded ranks (threads, in-process allreduce) compute what one
device does.

Every case checks prompt logits (float32, max |diff| <= 1e-5) and 32 greedy decode steps, token
by token through the KV cache, against the unsharded model.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import pytest
import torch
from helpers.hf_models import VOCAB, randomize_
from helpers.parallel import (
    run_sharded,
    shard_factory,
    sharded_greedy,
    sharded_logits,
    unsharded_greedy,
    unsharded_logits,
)

from edgetp.config.model import parse_hf_config
from edgetp.model.checkpoint import load_model
from edgetp.model.llama import Transformer
from edgetp.net.collectives import InProcessGroup
from edgetp.parallel.comm import SoloCommunicator
from edgetp.parallel.linears import ColumnParallelLinear, RowParallelLinear, shard_model
from edgetp.shard.plan import make_plan

ATOL = 1e-5  # logits of magnitude ~3; the larger models' (~25) also get RTOL of their largest:
RTOL = 1e-6  # a few float32 ulps either way (a different summation order, not a wrong one)
PROMPT_LEN = 12
DECODE_STEPS = 32
MAX_SEQ_LEN = 64

# Configs built straight from a config.json dict (random weights, no transformers needed).
RAW_BASE: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
RAW_CONFIGS: dict[str, dict[str, Any]] = {
    "gqa8x2": {},  # 8 heads, 2 KV heads: N=3 and N=8 exceed / N=3 doesn't divide the KV heads
    "mha6": {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 6},
    "mqa8": {"num_key_value_heads": 1},
    "biases": {"attention_bias": True, "mlp_bias": True},
    "odd_mlp": {"intermediate_size": 100, "num_key_value_heads": 4},
    "tied": {"tie_word_embeddings": True},
    "sliding": {"model_type": "mistral", "architectures": ["MistralForCausalLM"],
                "sliding_window": 8},
}

# (config, n ranks, shares); configs named "hf:<family>" come from tests/hf_models.
CASES: list[tuple[str, int, tuple[float, ...] | None]] = [
    ("gqa8x2", 1, None),
    ("gqa8x2", 2, None),
    ("gqa8x2", 3, None),
    ("gqa8x2", 4, None),
    ("gqa8x2", 8, None),
    ("gqa8x2", 2, (3, 1)),
    ("gqa8x2", 3, (2, 1, 1)),
    ("gqa8x2", 4, (1, 2, 3, 5)),
    ("mha6", 4, None),  # 4 does not divide the 6 heads
    ("mha6", 5, (1, 1, 1, 1, 2)),
    ("mqa8", 3, None),
    ("mqa8", 8, None),
    ("biases", 3, None),
    ("biases", 4, (3, 1, 1, 1)),
    ("odd_mlp", 3, None),
    ("tied", 3, (2, 1, 1)),
    ("sliding", 3, None),  # the decode crosses the window of 8
    ("hf:attn_bias", 3, None),
    ("hf:mlp_bias", 2, (3, 1)),
    ("hf:mlp_bias", 4, None),
    ("hf:qwen2", 3, None),
    ("hf:qwen2", 4, (2, 1, 1, 1)),
    ("hf:llama32", 2, None),  # tied embeddings
    ("hf:gqa1", 8, None),
    ("hf:head_dim", 3, None),
    ("hf:mistral", 8, (1, 1, 1, 1, 1, 1, 1, 2)),
]


def random_model(name: str, seed: int = 0) -> Transformer:
    config = parse_hf_config({**RAW_BASE, **RAW_CONFIGS[name]}, source=name)
    torch.manual_seed(seed)
    model = Transformer(config, max_seq_len=MAX_SEQ_LEN)
    randomize_(model, seed)
    model.allocate_cache()
    return model.eval()


@pytest.fixture
def full_model(tiny_model_dir, request) -> Transformer:
    name = request.param
    if name.startswith("hf:"):
        path, _ = tiny_model_dir(name[3:])
        return load_model(path, max_seq_len=MAX_SEQ_LEN)
    return random_model(name)


def prompt_tokens(n: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def build_ranks(full: Transformer, n: int, shares) -> list[Transformer]:
    plan = make_plan(full.config, n, shares)
    group = InProcessGroup(n)  # placeholder: run_sharded re-binds each run to a fresh group
    make = shard_factory(full, plan)
    return [make(rank, group.communicator(rank)) for rank in range(n)]


@pytest.mark.parametrize(
    "full_model, n, shares",
    CASES,
    indirect=["full_model"],
    ids=[f"{c}-N{n}" + (f"-{'_'.join(str(s) for s in sh)}" if sh else "") for c, n, sh in CASES],
)
def test_sharded_matches_unsharded(full_model, n, shares):
    ranks = build_ranks(full_model, n, shares)
    tokens = prompt_tokens()

    ref = unsharded_logits(full_model, tokens)
    ours = sharded_logits(ranks, n, tokens)
    assert ours.shape == ref.shape == (PROMPT_LEN, VOCAB) and ours.dtype == torch.float32
    tolerance = ATOL + RTOL * ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= tolerance, f"prompt logits differ by {diff:.3g}"

    ref_tokens, ref_logits = unsharded_greedy(full_model, tokens, DECODE_STEPS)
    our_tokens, our_logits = sharded_greedy(ranks, n, tokens, DECODE_STEPS)
    assert our_tokens == ref_tokens
    step_diff = max((a - b).abs().max().item() for a, b in zip(our_logits, ref_logits, strict=True))
    assert step_diff <= tolerance, f"decode logits differ by {step_diff:.3g}"


@torch.no_grad()
def test_rank_factory_path_and_solo_communicator():
    full = random_model("gqa8x2")
    tokens = prompt_tokens()
    ref = unsharded_logits(full, tokens)
    # ranks built inside their threads
    ours = sharded_logits(shard_factory(full, make_plan(full.config, 3)), 3, tokens)
    assert (ours - ref).abs().max().item() <= ATOL
    # a one-rank plan with the no-op communicator is the unsharded model
    solo = shard_model(copy.deepcopy(full), make_plan(full.config, 1), 0, SoloCommunicator())
    solo.allocate_cache()
    assert (solo(tokens, 0) - ref).abs().max().item() <= ATOL


def test_shard_shapes_follow_the_plan():
    full = random_model("biases")
    cfg = full.config
    plan = make_plan(cfg, 3, (2, 1, 1))
    ranks = build_ranks(full, 3, (2, 1, 1))
    hd, d = cfg.head_dim, cfg.hidden_size
    for rank, model in enumerate(ranks):
        share = plan.share(rank)
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            assert isinstance(attn.q_proj, ColumnParallelLinear)
            assert isinstance(attn.o_proj, RowParallelLinear)
            assert isinstance(mlp.down_proj, RowParallelLinear)
            assert attn.q_proj.weight.shape == (share.n_q_heads * hd, d)
            assert attn.q_proj.bias.shape == (share.n_q_heads * hd,)
            assert attn.k_proj.weight.shape == (share.n_kv_heads * hd, d)
            assert attn.o_proj.weight.shape == (d, share.n_q_heads * hd)
            assert attn.o_proj.bias.shape == (d,)  # whole: added once after the allreduce
            assert mlp.gate_proj.weight.shape == (share.n_mlp_columns, d)
            assert mlp.down_proj.weight.shape == (d, share.n_mlp_columns)
            assert attn.n_heads == share.n_q_heads and attn.n_kv_heads == share.n_kv_heads
            assert attn.k_cache is not None and attn.k_cache.shape[0] == share.n_kv_heads
        has_master = rank == 0
        for part in ("embed_tokens", "norm", "lm_head"):
            assert (getattr(model, part) is not None) == has_master


def test_shard_model_rejects_a_group_of_the_wrong_size():
    full = random_model("gqa8x2")
    with pytest.raises(ValueError, match="communicator of 2 ranks for a 3-rank plan"):
        shard_model(full, make_plan(full.config, 3), 0, InProcessGroup(2).communicator(0))


# --- the helper itself: errors surface, nothing hangs ----------------------------------------


def test_run_sharded_propagates_the_root_cause_quickly():
    def work(_model, ctx):
        if ctx.rank == 1:
            raise KeyError("boom on rank 1")
        return ctx.comm.allreduce(torch.ones(2))  # rank 0 and 2 would wait for rank 1

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 of 3 failed: KeyError") as info:
        run_sharded(lambda rank, comm: None, 3, work)
    assert isinstance(info.value.__cause__, KeyError)
    assert time.monotonic() - start < 5


def test_run_sharded_fails_instead_of_hanging():
    release = threading.Event()

    def work(_model, ctx):
        if ctx.rank == 1:
            release.wait(5)  # never reaches the allreduce in time
        return ctx.comm.allreduce(torch.ones(1))

    try:
        with pytest.raises((AssertionError, RuntimeError), match="rank"):
            run_sharded(lambda rank, comm: None, 2, work, timeout_s=0.5)
    finally:
        release.set()


def test_run_sharded_returns_rank_0_result_and_allreduce_sums():
    def work(_model, ctx):
        total = ctx.comm.allreduce(torch.tensor([float(ctx.rank + 1)]))
        return total.item(), ctx.broadcast("from root" if ctx.rank == 0 else "ignored")

    assert run_sharded(lambda rank, comm: None, 4, work) == (10.0, "from root")
