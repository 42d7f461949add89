"""The machine's read bandwidth, as the honest floor of a decode token: one stream, and several
at once, one per process, as a cluster's nodes run on one machine.

Each stream is a process of its own reading its own buffer (``nbytes``, well beyond any cache)
with the native streaming reader (:func:`edgetp.kernels.native.stream_read`: independent vector
accumulators as wide as the CPU has; torch's ``sum`` where the native kernels are off). The
streams of a round start together at a barrier and read for ``seconds``; a round's rate is all
its streams' bytes over the time from the first start to the last end, so streams the scheduler
happened to run one after another do not count double. The best of ``rounds`` rounds counts.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections.abc import Callable, Sequence
from typing import Any

Span = tuple[float, float, int]  # (start, end, bytes) of one stream in one round

MiB = 1 << 20
DEFAULT_BYTES = 256 * MiB


def reader_name() -> str:
    """What reads: ``native-avx2`` (the reader's vectors) or ``torch-sum``."""
    from edgetp.kernels import native

    return f"native-{native.stream_path()}" if native.available() else "torch-sum"


def read_buffer(nbytes: int) -> Any:
    """float32 ones [nbytes / 4] (at least 1024) in the memory weights are held in (huge
    pages, :mod:`edgetp.core.pages`): what a read-rate measurement reads."""
    import torch

    from edgetp.core.pages import huge_page_bytes

    return huge_page_bytes(max(nbytes // 4, 1024) * 4).view(torch.float32).fill_(1.0)


def _reader(nbytes: int) -> Callable[[], object]:
    """One pass over a fresh buffer of ``nbytes`` (every page touched), on this thread only."""
    import torch

    from edgetp.kernels import native

    torch.set_num_threads(1)
    buffer = read_buffer(nbytes)  # [N]
    if native.available():
        return lambda: native.stream_read(buffer)
    return buffer.sum


def _stream_child(index: int, counts: Sequence[int], nbytes: int, seconds: float, rounds: int,
                  barrier: Any, out: Any) -> None:
    """Stream ``index``: for each count of streams and round, its span when ``index < count``
    (else it waits at the barrier only). Times are CLOCK_MONOTONIC, shared by the processes."""
    read = _reader(nbytes)
    read()  # warm: the pages are faulted in, the library loaded
    spans: dict[int, list[Span]] = {}
    for count in counts:
        for _ in range(rounds):
            barrier.wait()
            if index < count:
                spans.setdefault(count, []).append(timed_span(lambda _i: read(), nbytes,
                                                              seconds))
    out.put(spans)


def timed_span(call: Callable[[int], object], nbytes: int, seconds: float) -> Span:
    """(start, end, bytes) of calling ``call(i)`` (the i-th call, each reading ``nbytes``)
    again and again for ``seconds``, at least once."""
    start, calls = time.monotonic(), 0
    while calls == 0 or time.monotonic() - start < seconds:
        call(calls)
        calls += 1
    return start, time.monotonic(), calls * nbytes


def round_rate(spans: list[Span]) -> float:
    """Bytes/s of one round's streams together (see the module docstring)."""
    return sum(b for _, _, b in spans) / (max(e for _, e, _ in spans) - min(s for s, _, _ in spans))


def read_rates(counts: Sequence[int], nbytes: int = DEFAULT_BYTES, seconds: float = 0.5,
               rounds: int = 3) -> dict[int, float]:
    """count of concurrent streams -> their total read bytes/s (the best round's)."""
    if not counts or min(counts) < 1:
        raise ValueError(f"stream counts must be >= 1, got {list(counts)}")
    results = run_streams(_stream_child, max(counts), (list(counts), nbytes, seconds, rounds),
                          120 + 4 * len(counts) * rounds * seconds)
    return {count: max(round_rate([r[count][i] for r in results if count in r])
                       for i in range(rounds)) for count in counts}


def run_streams(child: Callable[..., None], n: int, args: tuple[Any, ...], timeout_s: float
                ) -> list[Any]:
    """Run ``child(index, *args, barrier, out)`` in ``n`` spawned processes (a barrier they
    share, a queue each puts its one result on) and return the results as they came; a
    process that dies, or ``timeout_s`` passing, raises RuntimeError. Every process ends."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=child, args=(i, *args, barrier, out), daemon=True)
             for i in range(n)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    results: list[Any] = []
    try:
        while len(results) < n:
            try:
                results.append(out.get(timeout=1.0))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"a bandwidth stream process failed (exit codes {dead}; "
                                       "its traceback is above)") from None
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    return results
