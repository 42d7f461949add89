"""Running tensor-parallel ranks as threads of the test process (no network).

``run_sharded(models_or_factory, n, fn)`` starts ranks 0..n-1 as threads sharing one
:class:`~edgetp.net.collectives.InProcessGroup`, calls ``fn(model, ctx)`` on each and returns rank
0's result. An exception in any rank is re-raised in the caller (the first real error, not the
``BrokenBarrierError`` it causes in the peers), and a rank that does not finish in time fails
the test instead of hanging it.

``sharded_logits`` and ``sharded_greedy`` are the two workloads the tests need, mirroring how a
cluster runs: rank 0 embeds (and samples), every rank runs ``forward_layers`` on the same
hidden states, rank 0 applies the head. ``unsharded_logits`` / ``unsharded_greedy`` do the same
on a single-device model, as the reference.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from edgetp.model.llama import Transformer
from edgetp.net.collectives import InProcessGroup
from edgetp.parallel.comm import Communicator
from edgetp.parallel.linears import RowParallelLinear, shard_model
from edgetp.shard.plan import ShardPlan

RankFactory = Callable[[int, Communicator], Transformer]
DEFAULT_TIMEOUT_S = 60.0


@dataclass
class RankContext:
    """One rank's view of the run: its communicator plus a side channel for broadcasts."""

    rank: int
    world_size: int
    comm: Communicator
    _barrier: threading.Barrier
    _shared: dict[str, Any] = field(default_factory=dict)

    def broadcast(self, value: Any = None, root: int = 0) -> Any:
        """Every rank gets ``root``'s ``value`` (the others' arguments are ignored)."""
        if self.rank == root:
            self._shared["broadcast"] = value
        self._barrier.wait()
        out = self._shared["broadcast"]
        self._barrier.wait()  # nobody overwrites the slot before everyone has read it
        return out


def bind(model: Transformer, comm: Communicator) -> Transformer:
    """Point every row-parallel linear of an already sharded ``model`` at ``comm``."""
    for module in model.modules():
        if isinstance(module, RowParallelLinear):
            module.comm = comm
    return model


def shard_factory(full_model: Transformer, plan: ShardPlan) -> RankFactory:
    """A factory giving each rank its own sharded deep copy of ``full_model`` (cache allocated)."""

    def make(rank: int, comm: Communicator) -> Transformer:
        model = shard_model(copy.deepcopy(full_model), plan, rank, comm)
        model.allocate_cache()
        return model.eval()

    return make


def run_sharded(
    models_or_factory: Sequence[Transformer] | RankFactory,
    n: int,
    fn: Callable[[Transformer, RankContext], Any],
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Any:
    """Run ``fn(model, ctx)`` on ranks 0..n-1 as threads; return rank 0's result.

    ``models_or_factory`` is either ``n`` already sharded models (re-bound to a fresh group, so
    they can be reused across runs; reset their KV caches yourself if needed) or a factory
    ``(rank, comm) -> model`` called inside each rank's thread.
    """
    models = list(models_or_factory) if isinstance(models_or_factory, list | tuple) else None
    if models is not None and len(models) != n:
        raise ValueError(f"{len(models)} models given for {n} ranks")
    group = InProcessGroup(n, timeout_s=timeout_s)
    side_barrier = threading.Barrier(n, timeout=timeout_s)
    shared: dict[str, Any] = {}
    results: list[Any] = [None] * n
    errors: list[tuple[int, BaseException]] = []
    lock = threading.Lock()

    def abort_all() -> None:  # wake every peer blocked in a barrier, so nobody waits it out
        group._barrier.abort()
        side_barrier.abort()

    def body(rank: int) -> None:
        try:
            comm = group.communicator(rank)
            if models is None:
                model = models_or_factory(rank, comm)  # type: ignore[operator]
            else:
                model = bind(models[rank], comm)
            ctx = RankContext(rank, n, comm, side_barrier, shared)
            with torch.no_grad():
                results[rank] = fn(model, ctx)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            with lock:
                errors.append((rank, exc))
            abort_all()

    threads = [
        threading.Thread(target=body, args=(r,), name=f"rank-{r}", daemon=True) for r in range(n)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    if hung:
        abort_all()
        raise AssertionError(f"{', '.join(hung)} did not finish within {timeout_s:.0f} s")
    if errors:
        # The root cause, not the BrokenBarrierError it triggered in the other ranks.
        real = [(r, e) for r, e in errors if not isinstance(e, threading.BrokenBarrierError)]
        rank, exc = (real or errors)[0]
        raise RuntimeError(f"rank {rank} of {n} failed: {exc!r}") from exc
    return results[0]


def _embed_on_root(model: Transformer, ctx: RankContext, tokens: torch.Tensor) -> torch.Tensor:
    """Rank 0 embeds ``tokens`` and broadcasts the hidden states [T, d] to every rank."""
    return ctx.broadcast(model.embed(tokens) if ctx.rank == 0 else None)


def sharded_logits(
    models_or_factory: Sequence[Transformer] | RankFactory, n: int, tokens: torch.Tensor
) -> torch.Tensor:
    """Logits [T, vocab] of ``tokens`` (from position 0) computed by ``n`` sharded ranks."""

    def work(model: Transformer, ctx: RankContext) -> torch.Tensor | None:
        h = _embed_on_root(model, ctx, tokens)
        out = model.forward_layers(h, 0)
        return model.head(out) if ctx.rank == 0 else None

    return run_sharded(models_or_factory, n, work)


def sharded_greedy(
    models_or_factory: Sequence[Transformer] | RankFactory,
    n: int,
    prompt: torch.Tensor,
    steps: int,
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with the KV cache on ``n`` ranks: (new tokens, each step's logits).

    Rank 0 embeds the prompt (then each new token) and broadcasts the hidden states; every
    rank runs its layers; rank 0 applies the head and picks the argmax.
    """

    def work(model: Transformer, ctx: RankContext) -> tuple[list[int], list[torch.Tensor]]:
        tokens: list[int] = []
        logits: list[torch.Tensor] = []
        current, pos = prompt, 0
        for _ in range(steps):
            h = _embed_on_root(model, ctx, current)
            out = model.forward_layers(h, pos)
            pos += h.shape[0]
            if ctx.rank == 0:
                step_logits = model.head(out)[-1]
                token = int(step_logits.argmax())
                tokens.append(token)
                logits.append(step_logits)
                current = torch.tensor([token])
        return tokens, logits

    return run_sharded(models_or_factory, n, work)


@torch.no_grad()
def unsharded_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens, 0)


@torch.no_grad()
def unsharded_greedy(
    model: Transformer, prompt: torch.Tensor, steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    current, pos = prompt, 0
    for _ in range(steps):
        step_logits = model(current, pos)[-1]
        pos += current.shape[0]
        token = int(step_logits.argmax())
        tokens.append(token)
        logits.append(step_logits)
        current = torch.tensor([token])
    return tokens, logits
