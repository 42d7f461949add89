"""The request queue and the one thread that generates: :class:`GenerationQueue`.

This is the engine side of the server. Accepted jobs wait in a bounded FIFO queue; one
generation thread admits them into the master's decode batch
(:class:`~edgetp.runtime.batching.BatchScheduler`) while KV slots are free (admission control:
the others wait in the queue) and advances the batch round by round: a prompt chunk and a
decode step of every sequence. That thread never touches a socket nor the event loop: it emits
each job's events (text pieces, the result or an error) on the job. A job whose client went
away is dropped from the queue, or from the batch between two rounds. After each completed
generation an optional :class:`GenerationObserver` (the server's metrics) is told, on this
thread. With speculative decoding (``--draft``) each sequence of the batch drafts for itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Protocol

from edgetp.net.transport import ClusterError
from edgetp.runtime.batching import BatchedSequence, BatchScheduler, Ended
from edgetp.serve.errors import APIError, bad_request, shutting_down
from edgetp.serve.jobs import Failed, Finished, GenerationCancelled, Job, RequestRecord

if TYPE_CHECKING:
    from edgetp.runtime.engine import GenerationResult
    from edgetp.runtime.master import Master

log = logging.getLogger("edgetp.serve.generation")


class GenerationObserver(Protocol):
    def finished(self, job: Job, result: GenerationResult) -> None:
        """``job`` completed with ``result``: called on the generation thread before its
        answer is sent, so a client that reads the metrics after its answer sees it."""

    def answered(self) -> None:
        """A job's answer was sent (the generation thread, between two rounds): slower
        bookkeeping, such as collecting the workers' spans, goes here."""


class GenerationQueue:
    """The bounded FIFO of accepted jobs and the generation thread that drains it.

    ``stats`` counts outcomes (accepted, rejected, unavailable, completed, cancelled, skipped,
    failed, shutdown); ``records`` keeps the last 1000 requests. ``lock`` guards both and the
    queue. ``tokens`` counts the prompt and generated tokens of every generation that ran
    (``prompt``, ``generated``; also those of cancelled and failed ones).
    """

    def __init__(self, master: Master, capacity: int,
                 observer: GenerationObserver | None = None) -> None:
        self.master = master
        self.capacity = capacity
        self.observer = observer
        self.tokens: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.records: deque[RequestRecord] = deque(maxlen=1000)
        self.lock = threading.Condition()
        self._pending: deque[Job] = deque()
        self._running: dict[Job, BatchedSequence] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edgetp-generation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Answer every queued job, stop the running generations and let the thread end."""
        with self.lock:
            self._stopping = True
            while self._pending:
                job = self._pending.popleft()
                self._finish(job, "shutdown")
                job.emit(Failed(shutting_down()))
            for job in self._running:
                job.cancel("the server is shutting down")
            self.lock.notify_all()

    def join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def snapshot(self) -> tuple[int, int, dict[str, int]]:
        """The queue's length, the sequences being generated, and the outcome counts."""
        with self.lock:
            return len(self._pending), len(self._running), dict(self.stats)

    def slots(self) -> int:
        """Sequences generated together at most (the KV slots of every node)."""
        return self.master.batch_slots

    # -- the HTTP side ----------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue ``job`` or raise the APIError to answer with (503, 429)."""
        missing = self.master.missing_ranks()
        with self.lock:
            if self._stopping:
                raise shutting_down()
            if missing:
                self.stats["unavailable"] += 1
                raise APIError(503, f"the cluster is incomplete: worker rank(s) {missing} have "
                               "not joined the master; retry when they are back",
                               "server_error", None, "cluster_unavailable")
            if len(self._pending) >= self.capacity:
                self.stats["rejected"] += 1
                raise APIError(429, f"the server is busy: its request queue is full "
                               f"({len(self._pending)} waiting); retry later",
                               "rate_limit_error", None, "queue_full")
            job.record.queued_at = time.monotonic()  # the queue's order (preparing runs apart)
            self._pending.append(job)
            self.stats["accepted"] += 1
            self.records.append(job.record)
            self.lock.notify_all()

    def withdraw(self, job: Job, reason: str) -> None:
        """The client of ``job`` is gone: drop it from the queue, or stop its generation."""
        job.cancel(reason)
        with self.lock:
            if job in self._pending:
                self._pending.remove(job)
                self._finish(job, "skipped")
                log.info("%s skipped: %s while queued", job.id, reason)

    # -- the generation thread --------------------------------------------------------------

    def _finish(self, job: Job, outcome: str, result: GenerationResult | None = None) -> None:
        with self.lock:
            record = job.record
            record.outcome = outcome
            record.finished_at = time.monotonic()
            if result is not None:
                record.completion_tokens = len(result.token_ids)
                record.finish_reason = result.finish_reason
            if record.started_at is not None:  # it ran
                self.tokens["prompt"] += record.prompt_tokens
                self.tokens["generated"] += record.completion_tokens
            self.stats[outcome] += 1

    def _loop(self) -> None:
        scheduler = BatchScheduler(self.master.runner,  # type: ignore[arg-type]
                                   self.master.tokenizer, self.master.tokenizer.eos_token_ids,
                                   self.master.engine.speculation)
        while True:
            with self.lock:
                while not self._pending and not self._running and not self._stopping:
                    self.lock.wait()
                if self._stopping and not self._running:
                    return
                self._admit(scheduler)
            self._drop_cancelled(scheduler)
            self._advance(scheduler)

    def _admit(self, scheduler: BatchScheduler) -> None:
        """Move queued jobs into the batch while it has free slots (under the lock)."""
        while self._pending and not self._stopping:
            if scheduler.free_slots() == 0:
                break
            job = self._pending.popleft()
            self._start(job)
            try:
                self._running[job] = scheduler.admit(job.prompt_ids, job.sampling, job.gen,
                                                     job.on_text)
            except Exception as exc:  # noqa: BLE001 - a prompt that cannot run: its answer
                self._running.pop(job, None)
                job.emit(Failed(self._failure(job, exc)))

    def _start(self, job: Job) -> None:
        record = job.record
        record.started_at = time.monotonic()
        record.outcome = "running"
        record.completion_tokens = 0

    def _drop_cancelled(self, scheduler: BatchScheduler) -> None:
        """Jobs whose client went away (or the server stops) leave the batch now."""
        with self.lock:
            gone = [job for job in self._running if job.cancelled.is_set()]
            for job in gone:
                scheduler.drop(self._running.pop(job))
                job.emit(Failed(self._failure(job, GenerationCancelled(job.cancel_reason))))
            if gone:
                self.lock.notify_all()

    def _advance(self, scheduler: BatchScheduler) -> None:
        """One round of the batch; answer the jobs that ended in it (all of them when the
        round failed: the cluster lost their state)."""
        if not scheduler.active:
            return
        try:
            ended = scheduler.round()
        except Exception as exc:  # noqa: BLE001 - every job in the batch gets an answer
            ended = [Ended(sequence, error=exc) for sequence in scheduler.active]
            scheduler.active.clear()
        by_sequence = {id(sequence): job for job, sequence in self._running.items()}
        for end in ended:
            job = by_sequence[id(end.sequence)]
            with self.lock:
                self._running.pop(job, None)
                self.lock.notify_all()
            self._answer(job, end.result, end.error)

    def _answer(self, job: Job, result: GenerationResult | None,
                error: BaseException | None) -> None:
        """Emit ``job``'s last event; tell the observer of a completed one."""
        if result is None:
            assert error is not None
            job.emit(Failed(self._failure(job, error)))
            return
        self._finish(job, "completed", result)
        log.info("%s: %d prompt tokens, %d generated (%s), %.0f ms", job.id,
                 result.prompt_tokens, len(result.token_ids), result.finish_reason,
                 (time.monotonic() - (job.record.started_at or 0.0)) * 1000)
        if self.observer is not None:
            self.observer.finished(job, result)
        job.emit(Finished(result))
        if self.observer is not None:
            self.observer.answered()

    def _failure(self, job: Job, exc: BaseException) -> APIError:
        """Record why ``job``'s generation ended early; the error its client gets."""
        if isinstance(exc, GenerationCancelled):
            shutdown = self._stopping
            self._finish(job, "shutdown" if shutdown else "cancelled")
            log.info("%s cancelled after %d of at most %d tokens: %s", job.id,
                     job.record.completion_tokens, job.record.max_tokens, exc)
            return shutting_down() if shutdown else APIError(
                499, "the request was cancelled", "server_error")
        self._finish(job, "failed")
        if isinstance(exc, ClusterError):
            log.error("%s failed: %s", job.id, exc)
            return APIError(503, f"the cluster failed: {exc}", "server_error", None,
                            "cluster_error")
        if isinstance(exc, ValueError):  # e.g. a prompt that leaves no room in the context
            return bad_request(str(exc))
        log.exception("%s failed", job.id, exc_info=exc)
        return APIError(500, f"generation failed: {exc}", "server_error", None,
                        "generation_failed")
