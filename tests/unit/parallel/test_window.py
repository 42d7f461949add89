"""The sliding-window weight scheduler (``edgetp.parallel.window``) through the real loading
path.

Every test splits a tiny random model to disk and loads ranks with ``load_rank(...,
memory_budget=...)``, running them as threads of this process (``parallel_utils``):

* the output is bit-identical with and without a budget, whatever fraction of the blocks
  streams (none, about half, all), for 1 and 2 ranks and with private layers on the master;
* the resident weight bytes never exceed the budget, and the split into pinned and streamed
  blocks is :func:`~edgetp.parallel.pinning.choose_pinned`'s (itself unit-tested: everything
  pinned when it fits, the ring fits next to the pinned blocks, pinned blocks are spread, more
  budget never pins fewer bytes);
* without a budget (or with one that holds everything) there is no window and no disk read;
* the counters (bytes and blocks read, read and wait time, overlap) add up, and reset;
* a read error in the reader thread fails the request, names the file, and never hangs;
  once the file is back (deleted, truncated or unreadable before) the next forward, or a
  ``retry()``, reads it again and the output is the same;
* an interrupted forward (an exception mid-way, a partial range of layers) is followed by
  correct output (the window resynchronises);
* the master's embedding stays on disk (:class:`~edgetp.parallel.blocks.DiskEmbedding`), tied
  or not.

In separate processes (tests/integration/test_window_processes.py): a process exits cleanly
while its reader is busy, and ``edgetp generate --nodes 2 --memory-budget <about the minimum>``.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import deadline
from helpers.hf_models import VOCAB
from helpers.parallel import RankContext, run_sharded
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetp.core.units import format_bytes
from edgetp.model.llama import Transformer
from edgetp.net.collectives import InProcessGroup
from edgetp.parallel.blocks import DiskEmbedding, WindowError
from edgetp.parallel.comm import SoloCommunicator
from edgetp.parallel.loader import MemoryNeeds, load_rank, shard_memory_needs
from edgetp.parallel.pinning import choose_pinned
from edgetp.parallel.window import DEFAULT_RING_SLOTS, WeightWindow
from edgetp.shard.layout import layer_file
from edgetp.shard.manifest import read_manifest
from edgetp.shard.plan import ShardPlan
from edgetp.shard.split import split_checkpoint

MAX_SEQ_LEN = 64
DECODE_STEPS = 16
N_LAYERS = 6  # 12 or 13 blocks per rank (8 on a worker with private layers): "about half"
#                means something despite the ring
ERROR_DEADLINE_S = 10.0  # a read error must surface well within this

# name -> (ranks, private layers)
LAYOUTS = {"1rank": (1, 0), "2ranks": (2, 0), "2ranks-private1": (2, 1)}


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_model(tiny_model_dir, tmp_path_factory):
    """Factory ``(family, ranks, private_layers) -> rank directories``, cached per module."""
    cache: dict[tuple[str, int, int], list[Path]] = {}

    def make(family: str = "llama3", ranks: int = 1, private_layers: int = 0) -> list[Path]:
        key = (family, ranks, private_layers)
        if key not in cache:
            model_dir, _ = tiny_model_dir(family, num_hidden_layers=N_LAYERS)
            out = tmp_path_factory.mktemp(f"split_{family}_{ranks}_{private_layers}")
            cache[key] = split_checkpoint(model_dir, out, ranks,
                                          private_layers=private_layers).rank_dirs
        return cache[key]

    return make


def fresh_copy(dirs: list[Path], dest: Path) -> list[Path]:
    """A private copy of a split (for tests that damage files)."""
    out = []
    for d in dirs:
        shutil.copytree(d, dest / d.name)
        out.append(dest / d.name)
    return out


def needs_of(d: Path) -> MemoryNeeds:
    return shard_memory_needs(d, max_seq_len=MAX_SEQ_LEN)


def streamed_fraction(needs: MemoryNeeds, budget: int) -> float:
    """Fraction of the block bytes ``choose_pinned`` streams at ``budget``."""
    if budget >= needs.total:
        return 0.0
    pinned = choose_pinned(needs.blocks, budget - needs.fixed, DEFAULT_RING_SLOTS)
    streamed = sum(s for s, p in zip(needs.blocks, pinned, strict=True) if not p)
    return streamed / sum(needs.blocks)


def budget_for(needs: MemoryNeeds, mode: str) -> int | None:
    """The budget of ``mode``: none, nothing streamed, about half streamed, all streamed."""
    if mode == "no-budget":
        return None
    if mode == "stream-0%":
        return needs.total
    if mode == "stream-100%":
        return needs.minimum()
    assert mode == "stream-50%"
    candidates = [needs.minimum() + (needs.total - needs.minimum()) * i // 200
                  for i in range(1, 200)]
    return min(candidates, key=lambda b: abs(streamed_fraction(needs, b) - 0.5))


def load_ranks(dirs: list[Path], budgets: Sequence[int | None],
               ring_slots: int = DEFAULT_RING_SLOTS) -> list[Transformer]:
    """Every rank from its own directory (``run_sharded`` re-binds them to a fresh group)."""
    group = InProcessGroup(len(dirs))
    return [load_rank(d, group.communicator(r), max_seq_len=MAX_SEQ_LEN, memory_budget=b,
                      ring_slots=ring_slots)
            for r, (d, b) in enumerate(zip(dirs, budgets, strict=True))]


def close_all(models: Sequence[Transformer]) -> None:
    for model in models:
        if model.window is not None:
            model.window.close()


def prompt_tokens(n: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def greedy(models: list[Transformer], plan: ShardPlan, prompt: torch.Tensor,
           steps: int = DECODE_STEPS) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding the way the cluster runs it: (tokens, [prefill logits, step logits...]).

    Rank 0 embeds and runs its private first layers, every rank runs the shared layers, rank
    0 runs its private last layers and the head (``ClusterRunner._step``).
    """
    def work(model: Transformer, ctx: RankContext) -> tuple[list[int], list[torch.Tensor]]:
        n, k = plan.num_layers, plan.private_layers
        tokens: list[int] = []
        logits: list[torch.Tensor] = []
        current, pos = prompt, 0
        for _ in range(steps):
            h = None
            if ctx.rank == 0:
                h = model.forward_layers(model.embed(current), pos, range(0, k))
            h = model.forward_layers(ctx.broadcast(h), pos, plan.shared_layers)
            if ctx.rank == 0:
                out = model.head(model.forward_layers(h, pos, range(n - k, n)))
                logits.append(out if pos == 0 else out[-1])
                tokens.append(int(out[-1].argmax()))
            pos += current.numel()
            current = torch.tensor([ctx.broadcast(tokens[-1] if ctx.rank == 0 else None)])
        return tokens, logits

    return run_sharded(models, len(models), work)


def plan_of(dirs: list[Path]) -> ShardPlan:
    return read_manifest(dirs[0]).plan


def assert_same_run(got: tuple[list[int], list[torch.Tensor]],
                    want: tuple[list[int], list[torch.Tensor]], what: str) -> None:
    assert got[0] == want[0], f"{what}: tokens {got[0]} != {want[0]}"
    for step, (a, b) in enumerate(zip(got[1], want[1], strict=True)):
        assert torch.equal(a, b), (
            f"{what}: logits of step {step} differ by up to {(a - b).abs().max().item():.3g}")


def call_with_deadline(fn: Callable[[], Any], timeout_s: float = ERROR_DEADLINE_S) -> Any:
    """``fn()`` in a thread, in inference mode as a worker runs its steps: its result, its
    exception re-raised, or AssertionError with where it hangs."""
    def in_inference_mode() -> Any:
        with torch.inference_mode():
            return fn()

    return deadline.call_with_deadline(in_inference_mode, timeout_s, "the call")


def wait_until(condition: Callable[[], bool], what: Callable[[], str],
               timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not reached in {timeout_s:g} s: {what()}"
        time.sleep(0.005)


def settle(window: WeightWindow) -> None:
    """Wait until the reader is idle: every ring slot holds a block read ahead."""
    wait_until(lambda: all(s.block is not None and s.ready for s in window._slots),
               lambda: "a full ring; slots (block, ready, in use): "
                       f"{[(s.block, s.ready, s.in_use) for s in window._slots]}, "
                       f"next read {window._next_read}")


def pinned_bytes(sizes: Sequence[int], pinned: Sequence[bool]) -> int:
    return sum(s for s, p in zip(sizes, pinned, strict=True) if p)


def ring_for(sizes: Sequence[int], pinned: Sequence[bool], slots: int) -> int:
    streamed = [s for s, p in zip(sizes, pinned, strict=True) if not p]
    return slots * max(streamed) if streamed else 0


# -- identical output ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_runs(split_model):
    """Layout name -> the greedy run without a budget."""
    cache: dict[str, tuple[list[int], list[torch.Tensor]]] = {}

    def get(layout: str) -> tuple[list[int], list[torch.Tensor]]:
        if layout not in cache:
            ranks, private = LAYOUTS[layout]
            dirs = split_model("llama3", ranks, private)
            cache[layout] = greedy(load_ranks(dirs, [None] * ranks), plan_of(dirs), prompt_tokens())
        return cache[layout]

    return get


@pytest.mark.parametrize("mode", ["stream-0%", "stream-50%", "stream-100%"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_budget_gives_identical_output(split_model, reference_runs, layout, mode):
    ranks, private = LAYOUTS[layout]
    dirs = split_model("llama3", ranks, private)
    needs = [needs_of(d) for d in dirs]
    budgets = [budget_for(n, mode) for n in needs]
    fractions = [streamed_fraction(n, b) for n, b in zip(needs, budgets, strict=True)]
    if mode == "stream-0%":
        assert fractions == [0.0] * ranks
    elif mode == "stream-100%":
        assert fractions == [1.0] * ranks
    else:
        assert all(0.25 <= f <= 0.75 for f in fractions), fractions
    models = load_ranks(dirs, budgets)
    try:
        for model, fraction in zip(models, fractions, strict=True):
            assert (model.window is None) == (fraction == 0.0)
        assert_same_run(greedy(models, plan_of(dirs), prompt_tokens()), reference_runs(layout),
                        f"{layout}, {mode} (streamed fractions {fractions})")
    finally:
        close_all(models)


def test_tied_embeddings_streamed_head_identical_output(split_model):
    """llama32 ties lm_head to the embedding: the head block streams from embed.safetensors."""
    dirs = split_model("llama32", 2, 0)
    want = greedy(load_ranks(dirs, [None, None]), plan_of(dirs), prompt_tokens())
    models = load_ranks(dirs, [needs_of(d).minimum() for d in dirs])
    try:
        assert models[0].window.streamed[-1].name == "lm_head"
        assert models[0].window.streamed[-1].path.name == "embed.safetensors"
        assert_same_run(greedy(models, plan_of(dirs), prompt_tokens()), want,
                        "llama32 at the minimum")
    finally:
        close_all(models)


# -- resident bytes and the pinning policy ---------------------------------------------------


@pytest.mark.parametrize("ring_slots", [2, 3])
@pytest.mark.parametrize("layout", ["1rank", "2ranks-private1"])
def test_resident_bytes_never_exceed_the_budget(split_model, layout, ring_slots):
    ranks, private = LAYOUTS[layout]
    for rank, d in enumerate(split_model("llama3", ranks, private)):
        needs = needs_of(d)
        low, high = needs.minimum(ring_slots), needs.total
        for i in range(0, 11):
            budget = low + (high - 1 - low) * i // 10
            model = load_rank(d, InProcessGroup(ranks).communicator(rank),
                              max_seq_len=MAX_SEQ_LEN, memory_budget=budget,
                              ring_slots=ring_slots)
            window = model.window
            try:
                what = f"rank {rank}, budget {budget} (minimum {low}, total {high})"
                assert window is not None, what
                assert window.resident_bytes + needs.fixed <= budget, what
                expected = choose_pinned(needs.blocks, budget - needs.fixed, ring_slots)
                names = [b.name for b in window.pinned + window.streamed]
                order = {name: i for i, name in enumerate(sorted(names, key=block_order))}
                pinned = [False] * len(names)
                for block in window.pinned:
                    pinned[order[block.name]] = True
                assert pinned == expected, what
                assert window.pinned_bytes == pinned_bytes(needs.blocks, expected), what
                assert window.ring_bytes == ring_for(needs.blocks, expected, ring_slots), what
                # what is really held: each pinned block's own storage, the ring's buffers,
                # and nothing for a streamed block between forward passes
                held = {}
                for block in window.pinned:
                    for name in block.tensors:
                        storage = block.module.get_parameter(name).untyped_storage()
                        held[storage.data_ptr()] = storage.nbytes()
                assert sum(held.values()) == window.pinned_bytes, what
                assert sum(s.raw.nbytes for s in window._slots) == window.ring_bytes, what
                for block in window.streamed:
                    for name in block.tensors:
                        assert block.module.get_parameter(name).numel() == 0, what
            finally:
                window.close()


def block_order(name: str) -> tuple[int, int]:
    """Execution order of block names: layers.N.self_attn, layers.N.mlp, ..., lm_head."""
    if name == "lm_head":
        return (1 << 30, 0)
    _, index, part = name.split(".")
    return (int(index), 0 if part == "self_attn" else 1)


def test_choose_pinned_pins_everything_that_fits():
    sizes = [10, 30, 10, 30, 25]
    assert choose_pinned(sizes, sum(sizes), 2) == [True] * 5
    assert choose_pinned(sizes, 10 * sum(sizes), 2) == [True] * 5
    assert not all(choose_pinned(sizes, sum(sizes) - 1, 2))


def test_choose_pinned_at_the_minimum_streams_everything():
    sizes = [10, 30, 10, 30, 25]
    assert choose_pinned(sizes, 2 * 30, 2) == [False] * 5
    assert choose_pinned(sizes, 3 * 30, 3) == [False] * 5


block_sizes = st.lists(st.integers(min_value=1, max_value=1000), min_size=1, max_size=40)


def llama_like(draw: st.DrawFn) -> list[int]:
    layers = draw(st.integers(min_value=1, max_value=40))
    attn = draw(st.integers(min_value=1, max_value=400))
    mlp = draw(st.integers(min_value=1, max_value=1200))
    head = draw(st.sampled_from([[], [draw(st.integers(min_value=1, max_value=5000))]]))
    return [attn, mlp] * layers + head


any_sizes = st.one_of(block_sizes, st.composite(llama_like)())


@settings(max_examples=300, deadline=None)
@given(sizes=any_sizes, slots=st.integers(min_value=1, max_value=3),
       fraction=st.floats(min_value=0.0, max_value=1.2))
def test_choose_pinned_fits_the_ring_next_to_the_pinned_blocks(sizes, slots, fraction):
    low = slots * max(sizes)
    budget = low + int(fraction * sum(sizes))
    pinned = choose_pinned(sizes, budget, slots)
    assert len(pinned) == len(sizes)
    if sum(sizes) <= budget:
        assert all(pinned)
        return
    assert not all(pinned)
    # the ring is sized for the largest streamed block, and fits with the pinned bytes
    assert pinned_bytes(sizes, pinned) + ring_for(sizes, pinned, slots) <= budget


@settings(max_examples=500, deadline=None)
@given(sizes=any_sizes, slots=st.integers(min_value=1, max_value=3),
       fraction=st.floats(min_value=0.0, max_value=1.0), step=st.integers(1, 2000))
def test_choose_pinned_is_monotone(sizes, slots, fraction, step):
    """A bigger budget never pins fewer bytes (never reads more per token)."""
    budget = slots * max(sizes) + int(fraction * sum(sizes))
    smaller = pinned_bytes(sizes, choose_pinned(sizes, budget, slots))
    bigger = pinned_bytes(sizes, choose_pinned(sizes, budget + step, slots))
    assert smaller <= bigger, f"budget {budget}: {smaller} bytes pinned, {budget + step}: {bigger}"


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_choose_pinned_is_monotone_over_every_budget(slots):
    """Byte by byte over the whole range, for a Llama-shaped rank 0 (attention, MLP, head)."""
    sizes = [16, 48] * 8 + [40]
    previous = -1
    for budget in range(slots * max(sizes), sum(sizes) + 2):
        pinned = pinned_bytes(sizes, choose_pinned(sizes, budget, slots))
        assert pinned >= previous, f"budget {budget} pins {pinned} bytes, {budget - 1}: more"
        previous = pinned


@pytest.mark.parametrize("sizes", [[10] * 20, [16, 48] * 10, [16, 48] * 10 + [60]],
                         ids=["uniform", "attn-mlp", "attn-mlp-head"])
def test_choose_pinned_spreads_pinned_blocks(sizes):
    """About half the bytes pinned: pinned blocks interleave with streamed ones, no prefix."""
    slots = 2
    budget = slots * max(sizes) + sum(sizes) // 2
    pinned = choose_pinned(sizes, budget, slots)
    share = pinned_bytes(sizes, pinned) / sum(sizes)
    assert 0.35 <= share <= 0.6, share
    n = len(sizes)
    first, second = pinned[: n // 2], pinned[n // 2 :]
    assert any(first) and any(second), pinned
    k = sum(pinned)
    assert pinned != [True] * k + [False] * (n - k), f"pinned blocks form a prefix: {pinned}"
    # no long run of consecutive streamed blocks anywhere: the reader always has cover
    longest, run = 0, 0
    for p in pinned:
        run = 0 if p else run + 1
        longest = max(longest, run)
    assert longest <= 4, f"{longest} consecutive streamed blocks: {pinned}"


def test_choose_pinned_pins_an_oversized_head_first():
    """An lm_head much larger than the rest would size the ring; pinning it shrinks the ring
    (two head-sized buffers) by more than it costs, so it is the first block pinned."""
    sizes = [10, 30] * 16 + [200]
    budget = 2 * 200 + 20  # just above the minimum (a ring of two head-sized buffers)
    pinned = choose_pinned(sizes, budget, 2)
    assert pinned[-1], pinned
    assert pinned_bytes(sizes, pinned) + ring_for(sizes, pinned, 2) <= budget
    assert pinned_bytes(sizes, pinned) >= 200 + 120


# -- no budget, no window ---------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["none", "total", "twice"])
def test_no_window_without_a_real_budget(split_model, tmp_path, budget):
    """No window, a resident embedding, and nothing read from disk after loading: the forward
    pass runs even with the shard directory gone."""
    [d] = fresh_copy(split_model("llama3", 1, 0), tmp_path)
    needs = needs_of(d)
    value = {"none": None, "total": needs.total, "twice": 2 * needs.total}[budget]
    model = load_rank(d, SoloCommunicator(), max_seq_len=MAX_SEQ_LEN, memory_budget=value)
    assert model.window is None
    assert isinstance(model.embed_tokens, torch.nn.Embedding)
    shutil.rmtree(d)
    with torch.no_grad():
        logits = model(prompt_tokens(), 0)
    assert torch.isfinite(logits).all()


# -- counters ---------------------------------------------------------------------------------


def test_counters_with_everything_streamed(split_model):
    [d] = split_model("llama3", 1, 0)
    needs = needs_of(d)
    model = load_rank(d, SoloCommunicator(), max_seq_len=MAX_SEQ_LEN,
                      memory_budget=needs.minimum())
    window = model.window
    try:
        assert not window.pinned
        n_streamed = len(window.streamed)
        streamed_bytes = sum(b.nbytes for b in window.streamed)
        settle(window)  # the reader fills the ring right away; count from when it is idle
        window.take_stats()
        n_passes = 5
        with torch.no_grad():
            for step in range(n_passes):
                model(prompt_tokens(1, seed=step), step)
        # reads since the reset: the rest of pass 1, passes 2..N, and the read-ahead of pass
        # N+1 (the first ``slots`` blocks, as before pass 1): exactly N passes' worth
        settle(window)
        stats = window.take_stats()
        assert stats.blocks_read == n_passes * n_streamed
        assert stats.bytes_read == n_passes * streamed_bytes
        assert stats.read_s > 0 and stats.wait_s >= 0
        assert 0.0 <= stats.overlap <= 1.0
        assert set(stats.per_block_wait_s) <= {b.name for b in window.streamed}
        assert all(v >= 0 for v in stats.per_block_wait_s.values())
        assert stats.resident_bytes == window.resident_bytes
        assert stats.resident_peak_bytes <= needs.minimum() - needs.fixed
        # take_stats resets everything but the resident figures
        fresh = window.take_stats()
        assert (fresh.bytes_read, fresh.blocks_read, fresh.read_s, fresh.wait_s) == (0, 0, 0, 0)
        assert fresh.per_block_wait_s == {}
        assert fresh.resident_bytes == window.resident_bytes
        assert fresh.overlap == 1.0
    finally:
        window.close()


def test_counters_on_both_ranks(split_model):
    dirs = split_model("llama3", 2, 0)
    models = load_ranks(dirs, [needs_of(d).minimum() for d in dirs])
    try:
        for model in models:
            settle(model.window)
            model.window.take_stats()
        greedy(models, plan_of(dirs), prompt_tokens(), steps=4)
        for model in models:
            settle(model.window)
            stats = model.window.take_stats()
            assert stats.blocks_read == 4 * len(model.window.streamed)
            assert stats.bytes_read == 4 * sum(b.nbytes for b in model.window.streamed)
            assert 0.0 <= stats.overlap <= 1.0 and stats.wait_s >= 0 and stats.read_s >= 0
    finally:
        close_all(models)


# -- read errors ------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("damage", [truncate, delete], ids=["truncated", "deleted"])
def test_read_error_fails_the_request_naming_the_file(split_model, tmp_path, damage):
    [d] = fresh_copy(split_model("llama3", 1, 0), tmp_path)
    model = load_rank(d, SoloCommunicator(), max_seq_len=MAX_SEQ_LEN,
                      memory_budget=needs_of(d).minimum())  # load-time checks pass
    victim = d / layer_file(N_LAYERS - 1)  # not read ahead at load time
    damage(victim)
    try:
        started = time.monotonic()
        with pytest.raises(WindowError) as info, torch.no_grad():
            call_with_deadline(lambda: model(prompt_tokens(), 0))
        assert str(victim) in str(info.value)
        assert time.monotonic() - started < 5.0
        # the window stays failed, and says so again promptly (no hang on a dead reader)
        with pytest.raises(WindowError, match=re.escape(str(victim))), torch.no_grad():
            call_with_deadline(lambda: model(prompt_tokens(), 0))
    finally:
        model.window.close()


@pytest.mark.parametrize("damage", [truncate, delete], ids=["truncated", "deleted"])
def test_read_error_on_a_worker_rank_fails_the_run(split_model, tmp_path, damage):
    dirs = fresh_copy(split_model("llama3", 2, 0), tmp_path)
    models = load_ranks(dirs, [needs_of(d).minimum() for d in dirs])
    victim = dirs[1] / layer_file(2)
    damage(victim)
    try:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 1") as info:
            greedy(models, plan_of(dirs), prompt_tokens(), steps=2)
        assert isinstance(info.value.__cause__, WindowError)
        assert str(victim) in str(info.value.__cause__)
        assert time.monotonic() - started < ERROR_DEADLINE_S
    finally:
        close_all(models)


def damage_and_keep(path: Path, how: str, keep: Path) -> None:
    """Damage ``path`` the way ``how`` says, keeping its bytes in ``keep`` to restore it."""
    shutil.copy2(path, keep)
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        truncate(path)
    else:
        assert how == "unreadable"  # (a mode of 0 would not stop root): a directory in its place
        path.unlink()
        path.mkdir()


def restore(path: Path, kept: Path) -> None:
    if path.is_dir():
        path.rmdir()
    shutil.copy2(kept, path)


@pytest.mark.parametrize("how", ["deleted", "truncated", "unreadable"])
def test_a_file_that_comes_back_is_read_again(split_model, tmp_path, how):
    """A failed read fails one forward; once the file is back, the next forward reads it and
    gives the same logits, with no restart, and ``failure`` says why until then."""
    [d] = fresh_copy(split_model("llama3", 1, 0), tmp_path)
    model = load_rank(d, SoloCommunicator(), max_seq_len=MAX_SEQ_LEN,
                      memory_budget=needs_of(d).minimum())
    victim = d / layer_file(N_LAYERS - 1)
    try:
        want = call_with_deadline(lambda: model(prompt_tokens(), 0))
        damage_and_keep(victim, how, tmp_path / "kept")
        for _ in range(2):  # it stays failed while the file is away
            with pytest.raises(WindowError, match=re.escape(str(victim))):
                call_with_deadline(lambda: model(prompt_tokens(), 0))
        restore(victim, tmp_path / "kept")
        got = call_with_deadline(lambda: model(prompt_tokens(), 0))
        assert torch.equal(got, want)
        assert model.window.failure is None
    finally:
        model.window.close()


def test_retry_reads_the_failed_block_without_a_forward(split_model, tmp_path):
    """``retry()`` (what an idle worker calls) clears ``failure`` once the file is back."""
    [d] = fresh_copy(split_model("llama3", 1, 0), tmp_path)
    model = load_rank(d, SoloCommunicator(), max_seq_len=MAX_SEQ_LEN,
                      memory_budget=needs_of(d).minimum())
    victim = d / layer_file(N_LAYERS - 1)
    window = model.window
    try:
        damage_and_keep(victim, "deleted", tmp_path / "kept")
        with pytest.raises(WindowError):
            call_with_deadline(lambda: model(prompt_tokens(), 0))
        assert str(victim) in (window.failure or "")
        window.retry()  # still gone: the retry fails again
        time.sleep(0.2)
        assert str(victim) in (window.failure or "")
        restore(victim, tmp_path / "kept")
        window.retry()
        wait_until(lambda: window.failure is None, lambda: f"failure {window.failure!r}")
    finally:
        window.close()


def test_budget_below_the_minimum_names_the_minimum(split_model):
    [d] = split_model("llama3", 1, 0)
    needs = needs_of(d)
    with pytest.raises(WindowError) as info:
        load_rank(d, SoloCommunicator(), max_seq_len=MAX_SEQ_LEN,
                  memory_budget=needs.minimum() - 1)
    assert format_bytes(needs.minimum()) in str(info.value)
    assert "--memory-budget" in str(info.value)
    with pytest.raises(WindowError, match=re.escape(format_bytes(needs.minimum(3)))):
        load_rank(d, SoloCommunicator(), max_seq_len=MAX_SEQ_LEN,
                  memory_budget=needs.minimum(3) - 1, ring_slots=3)


# -- resynchronisation after an interrupted forward ---------------------------------------------


class Boom(Exception):
    pass


def raise_once(module: torch.nn.Module) -> None:
    """Make ``module``'s next forward raise :class:`Boom` (after the window's own pre-hook, for
    a module called with hooks; a layer's norms and projections are called by ``forward``)."""

    def forward(*_args: object, **_kwargs: object) -> None:
        del module.forward  # the class's forward again
        raise Boom

    module.forward = forward  # type: ignore[method-assign]


INTERRUPTIONS: dict[str, Callable[[Transformer, torch.Tensor], None]] = {}


def interruption(fn: Callable[[Transformer, torch.Tensor], None]):
    INTERRUPTIONS[fn.__name__] = fn
    return fn


@interruption
def raise_between_blocks(model: Transformer, tokens: torch.Tensor) -> None:
    raise_once(model.layers[2].input_layernorm)
    with pytest.raises(Boom):
        model(tokens, 0)


@interruption
def raise_inside_a_block(model: Transformer, tokens: torch.Tensor) -> None:
    """The block's weights are acquired, then its forward fails: the release hook never runs."""
    raise_once(model.layers[1].mlp)
    with pytest.raises(Boom):
        model(tokens, 0)


@interruption
def raise_in_the_head(model: Transformer, tokens: torch.Tensor) -> None:
    raise_once(model.lm_head)
    with pytest.raises(Boom):
        model(tokens, 0)


@interruption
def first_layers_only(model: Transformer, tokens: torch.Tensor) -> None:
    model.forward_layers(model.embed(tokens), 0, range(0, 2))


@interruption
def last_layers_only(model: Transformer, tokens: torch.Tensor) -> None:
    model.forward_layers(model.embed(tokens), 0, range(2, N_LAYERS))


@interruption
def layers_without_head(model: Transformer, tokens: torch.Tensor) -> None:
    model.forward_layers(model.embed(tokens), 0)


@pytest.mark.parametrize("mode", ["stream-50%", "stream-100%"])
@pytest.mark.parametrize("name", list(INTERRUPTIONS))
def test_interrupted_forward_then_full_forward_is_correct(split_model, name, mode):
    [d] = split_model("llama3", 1, 0)
    reference = load_rank(d, SoloCommunicator(), max_seq_len=MAX_SEQ_LEN)
    model = load_rank(d, SoloCommunicator(), max_seq_len=MAX_SEQ_LEN,
                      memory_budget=budget_for(needs_of(d), mode))
    tokens = prompt_tokens()
    window = model.window
    try:
        with torch.no_grad():
            want = reference(tokens, 0)
            for attempt in range(3):
                call_with_deadline(lambda: INTERRUPTIONS[name](model, tokens))
                got = call_with_deadline(lambda: model(tokens, 0))
                assert torch.equal(got, want), f"attempt {attempt}: first pass after"
                # back to normal: each further pass reads each streamed block exactly once
                settle(window)
                window.take_stats()
                for repeat in range(2):
                    got = call_with_deadline(lambda: model(tokens, 0))
                    assert torch.equal(got, want), f"attempt {attempt}, pass {repeat + 2}"
                settle(window)
                assert window.take_stats().blocks_read == 2 * len(window.streamed)
            # and decoding continues correctly from there
            assert torch.equal(call_with_deadline(lambda: model(tokens[:1], len(tokens))),
                               reference(tokens[:1], len(tokens)))
    finally:
        window.close()


# -- the embedding stays on disk ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama3", "llama32"], ids=["untied", "tied"])
def test_master_embedding_reads_rows_from_disk(split_model, family):
    dirs = split_model(family, 2, 0)
    resident = load_rank(dirs[0], InProcessGroup(2).communicator(0), max_seq_len=MAX_SEQ_LEN)
    model = load_rank(dirs[0], InProcessGroup(2).communicator(0), max_seq_len=MAX_SEQ_LEN,
                      memory_budget=needs_of(dirs[0]).minimum())
    try:
        assert isinstance(model.embed_tokens, DiskEmbedding)
        assert model.embed_tokens.path == dirs[0] / "embed.safetensors"
        all_ids = torch.arange(VOCAB)
        table = resident.embed_tokens.weight
        assert torch.equal(model.embed(all_ids), table)
        ids = torch.tensor([5, 5, 0, VOCAB - 1, 17])
        assert torch.equal(model.embed(ids), table[ids])
        assert model.embed(torch.tensor([], dtype=torch.int64)).shape == (0, table.shape[1])
        for bad in (-1, VOCAB):
            with pytest.raises(ValueError, match="out of range"):
                model.embed(torch.tensor([1, bad]))
        if family == "llama32":
            assert resident.lm_head.weight is resident.embed_tokens.weight
    finally:
        model.window.close()
