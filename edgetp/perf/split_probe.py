"""What splitting a model's layer products over several processes gains on this machine, with
nothing of the runtime around them: the most tensor parallelism can gain on one memory bus.

One device is one process computing every layer's seven decode products (q, k, v, o; gate, up,
down) on its threads, then the lm_head's; the split is ``parts`` processes, each with the
slices a rank of ``edgetp split`` holds (its own plan: q, k, v, gate and up by output rows, o
and down by input columns), meeting at a spinning barrier after each layer half, where a
cluster's ranks meet at their allreduce, and after the head, which the first rank computes
whole as the master does while the others wait. No messages, no Python between the products but
a loop, no norms or attention: so the split's ms/token over the device's is what the products
alone get from the split here, the ceiling for a cluster whose nodes share this machine's
memory bus. On separate devices each rank has a bus of its own; on one machine both halves
stream through one.

The device and the split's ranks are loaded at once (twice the layers' bytes) and run in
alternating rounds (device, split, device, ...), so a host whose memory rate moves over minutes
moves both alike. Weights are random, each dtype in the form a node loads (bfloat16, int8 in
32-column blocks where the width allows, int4 in groups of ``group``; the head as a split
stores it), one layer made and then copied to every layer's place in huge-page memory, so every
token streams them all from memory.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from edgetp.config.model import ModelConfig
from edgetp.core.pages import pack
from edgetp.kernels import native
from edgetp.parallel.qlinear import int4_product, int8_product
from edgetp.runtime.lifeline import follow_parent
from edgetp.shard.plan import layer_slices, make_plan
from edgetp.shard.quant import (
    INT8_BLOCK,
    head_format,
    native_int4_tiled,
    quantize_int4,
    quantize_int8,
    quantize_int8_blocks,
)

DTYPES = ("float32", "bfloat16", "int8", "int4")
Product = Callable[[], object]  # one decode product, into its step buffer


Shape = tuple[int, int]  # a weight's [out, in]
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class RankWork:
    """One process's weights: a layer's attention-half and MLP-half products as the rank's
    slices ([out, in] each), the number of layers, and the head's shape on the master."""

    attention: tuple[Shape, ...]
    mlp: tuple[Shape, ...]
    layers: int
    head: Shape | None


def rank_work(config: ModelConfig, parts: int, rank: int) -> RankWork:
    """What rank ``rank`` of a ``parts``-way split holds, sliced by ``edgetp split``'s own plan
    (:func:`~edgetp.shard.plan.make_plan`, even shares): a PlanError where it cannot split."""
    slices = layer_slices(make_plan(config, parts), rank, config)
    h, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * \
        config.head_dim
    full = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}

    def sliced(names: tuple[str, ...], prefix: str) -> tuple[Shape, ...]:
        shapes = (slices[f"{prefix}.{n}.weight"].shape_of(full[n]) for n in names)
        return tuple((out, inp) for out, inp in shapes)

    head = (config.vocab_size, h) if rank == 0 else None
    return RankWork(sliced(ATTENTION, "self_attn"), sliced(MLP, "mlp"),
                    config.num_hidden_layers, head)


def stored(dtype: str, w: torch.Tensor, group: int) -> tuple[torch.Tensor, ...]:
    """w [out, in] float32 -> the tensors a node holds of it in ``dtype``."""
    if dtype == "float32":
        return (w,)
    if dtype == "bfloat16":
        return (w.to(torch.bfloat16),)
    if dtype == "int8":  # in 32-column blocks where the width allows, as a split stores it
        return quantize_int8_blocks(w) if w.shape[1] % INT8_BLOCK == 0 else quantize_int8(w)
    if dtype == "int4":
        return quantize_int4(w, group)
    raise ValueError(f"unknown weight dtype {dtype!r}; one of {', '.join(DTYPES)}")


def product(dtype: str, weight: tuple[torch.Tensor, ...], x: torch.Tensor, out: torch.Tensor,
            group: int) -> Product:
    """One decode product of ``weight`` (as :func:`stored`) as a node's linear computes it:
    ``out`` [1, rows] = x [1, cols] @ weight^T (``x`` and ``out`` as :func:`step_rows` makes
    them; the quantized dtypes through the native kernels where they exist)."""
    if dtype in ("float32", "bfloat16"):
        return lambda: native.linear(x, weight[0], out)
    codes, scales = weight  # int8: (q, scale); int4: (packed, scale_zero)
    if dtype == "int8":
        return lambda: int8_product(x, codes, scales, out=out)
    tiled = native_int4_tiled()
    return lambda: int4_product(x, codes, scales, group, tiled, out=out)


def step_rows(dtype: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A product's input row x [1, cols] (random) and step buffer [1, rows]: bfloat16 for a
    bfloat16 weight (computed in bfloat16), float32 for the others."""
    compute = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    return torch.randn(1, cols).to(compute), torch.empty(1, rows, dtype=compute)


def layer_products(work: RankWork, dtype: str, group: int
                   ) -> list[tuple[list[Product], list[Product]]]:
    """Every layer's (attention half, MLP half) products of one process: one layer's weights
    made and quantized, copied into each layer's own huge-page memory."""
    generator = torch.Generator().manual_seed(len(work.attention) + work.attention[0][0])
    layer = [[(rows, cols, stored(dtype, torch.randn(rows, cols, generator=generator)
                                  .mul_(0.02), group)) for rows, cols in half]
             for half in (work.attention, work.mlp)]

    def copy(half: list[tuple[int, int, tuple[torch.Tensor, ...]]]) -> list[Product]:
        return [product(dtype, tuple(pack(weight)), *step_rows(dtype, rows, cols), group)
                for rows, cols, weight in half]

    return [(copy(layer[0]), copy(layer[1])) for _ in range(work.layers)]


def head_product(head: Shape, dtype: str, group: int) -> Product:
    """The lm_head's product ([vocab, hidden]), stored as a split of ``dtype`` stores it."""
    fmt = head_format(dtype, None, "float32")
    w = torch.randn(*head, generator=torch.Generator().manual_seed(0))
    weight = tuple(pack(stored(fmt, w.mul_(0.02), group)))
    return product(fmt, weight, *step_rows(fmt, *head), group)


class SpinBarrier:
    """The split's ranks meeting after a layer half: each raises its own count in shared memory
    and spins until every rank's count reaches it (as a rank spins on its allreduce)."""

    def __init__(self, counts: Any, rank: int) -> None:
        self.counts, self.rank, self.meetings = counts, rank, 0

    def wait(self) -> None:
        self.meetings += 1
        self.counts[self.rank] = self.meetings
        while min(self.counts) < self.meetings:
            pass


def token_ms(layers: list[tuple[list[Product], list[Product]]], head: Product | None,
             meet: Callable[[], None], tokens: int) -> float:
    """Median ms of a token: every layer's products, ``meet`` after each half; the head (on
    the rank that has one) and ``meet`` once more."""
    times = []
    for _ in range(tokens):
        start = time.perf_counter()
        for attention, mlp in layers:
            for call in attention:
                call()
            meet()
            for call in mlp:
                call()
            meet()
        if head is not None:
            head()
        meet()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _probe_child(index: int, work: RankWork, dtype: str, group: int, threads: int,
                 tokens: int, counts: Any, parent_pid: int, conn: Any) -> None:
    """Process ``index``: 0 the device (every product whole), 1..parts the split's ranks.
    Ends with its parent, even a SIGKILLed one (a rank may be spinning for a dead peer). Loads,
    warms up and says so on ``conn``; then for each "run" the parent sends, times ``tokens``
    tokens and sends their median ms, until "stop"."""
    follow_parent(parent_pid)
    torch.set_num_threads(threads)
    native.set_threads(threads)
    layers = layer_products(work, dtype, group)
    head = None if work.head is None else head_product(work.head, dtype, group)
    token_ms(layers, head, lambda: None, 1)  # warm: pages touched, kernels loaded
    meet = (lambda: None) if index == 0 else SpinBarrier(counts, index - 1).wait
    conn.send(None)
    while conn.recv() == "run":
        conn.send(token_ms(layers, head, meet, tokens))


class SplitProbe:
    """The device's process and the split's ranks, loaded once and kept, timed one round at a
    time (:meth:`round`), so a caller can interleave the rounds with its own runs. A process
    that dies or hangs ends the session with a RuntimeError; every process ends with it."""

    def __init__(self, config: ModelConfig, dtype: str, parts: int = 2, threads: int = 1,
                 group: int = 32, tokens: int = 6, timeout_s: float | None = None) -> None:
        if dtype not in DTYPES:  # here, not in each process
            raise ValueError(f"unknown weight dtype {dtype!r}; one of {', '.join(DTYPES)}")
        works = [rank_work(config, 1, 0), *(rank_work(config, parts, r) for r in range(parts))]
        self.timeout_s = timeout_s or 120 + 4.0 * tokens * config.num_hidden_layers
        ctx = mp.get_context("spawn")
        counts = ctx.RawArray("q", parts)
        pipes = [ctx.Pipe() for _ in works]
        self.conns = [ours for ours, _ in pipes]
        self.theirs = [theirs for _, theirs in pipes]
        self.failed = False
        self.procs = [ctx.Process(target=_probe_child, daemon=True,
                                  args=(i, work, dtype, group, threads, tokens, counts,
                                        os.getpid(), theirs))
                      for i, (work, theirs) in enumerate(zip(works, self.theirs, strict=True))]

    def __enter__(self) -> SplitProbe:
        try:
            for proc, theirs in zip(self.procs, self.theirs, strict=True):
                proc.start()
                theirs.close()  # the child's end is the child's: a dead child reads as EOF
            self._replies(range(len(self.procs)), 300 + self.timeout_s)  # loaded and warm
        except BaseException:
            self._end()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._end()

    def round(self) -> tuple[float, float]:
        """One round: (device ms/token, the split's: its slowest rank's)."""
        device = self._run([0])
        split = self._run(range(1, len(self.procs)))
        return device[0], max(split)

    def _run(self, indices: range | list[int]) -> list[float]:
        for i in indices:
            self._send(i, "run")
        return self._replies(indices, self.timeout_s)

    def _send(self, index: int, message: str) -> None:
        try:
            self.conns[index].send(message)
        except OSError:  # its process is gone
            raise RuntimeError(self._failure()) from None

    def _replies(self, indices: range | list[int], timeout_s: float) -> list[float]:
        """Each process's next message, in order; a dead process or the deadline raises."""
        deadline, out = time.monotonic() + timeout_s, []
        for i in indices:
            while not self.conns[i].poll(0.5):  # a dead rank leaves the others spinning:
                if (time.monotonic() > deadline  # any death ends the wait
                        or any(p.exitcode is not None for p in self.procs)):
                    raise RuntimeError(self._failure())
            try:
                out.append(self.conns[i].recv())
            except (EOFError, OSError):
                raise RuntimeError(self._failure()) from None
        return out

    def _failure(self) -> str:
        self.failed = True  # the others may spin for a dead rank: end them at once
        codes = [p.exitcode for p in self.procs]
        return (f"a bare-split process failed or hung (exit codes {codes}; a traceback, if "
                "any, is above): check the machine's free memory")

    def _end(self) -> None:
        for conn, proc in zip(self.conns, self.procs, strict=True):
            with contextlib.suppress(OSError):
                if proc.is_alive():
                    conn.send("stop")
        for proc in self.procs:
            if proc.pid is None:
                continue
            proc.join(timeout=0 if self.failed else 10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in (*self.conns, *self.theirs):  # a child's end too, if it never started
            conn.close()


def split_probe(config: ModelConfig, dtype: str, parts: int = 2, threads: int = 1,
                group: int = 32, tokens: int = 6, rounds: int = 3) -> dict[str, Any]:
    """The device (one process of ``threads`` threads) against ``parts`` processes of
    ``threads`` threads each holding a rank's slices, in ``rounds`` alternating rounds of
    ``tokens`` tokens (:class:`SplitProbe`): see :func:`summary`."""
    with SplitProbe(config, dtype, parts, threads, group, tokens) as probe:
        times = [probe.round() for _ in range(rounds)]
    return summary(times)


def summary(times: list[tuple[float, float]]) -> dict[str, Any]:
    """Rounds' (device, split) ms/token -> each side's per round, the ratios split / device
    and the median round's ratio."""
    ratios = [split / device for device, split in times]
    return {"device_ms": [d for d, _ in times], "split_ms": [s for _, s in times],
            "ratios": ratios, "ratio": statistics.median(ratios)}
