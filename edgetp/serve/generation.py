"""The request queue and the one thread that generates: :class:`GenerationQueue`.

This is the engine side of the server. A cluster computes one sequence at a time, so accepted
jobs wait in a bounded FIFO queue that one generation thread drains. That thread never touches
a socket nor the event loop: it runs the master's engine and emits the job's events (text
pieces, the result or an error) on the job. A job whose client went away is dropped from the
queue, or its generation is stopped between two steps. After each completed generation an
optional :class:`GenerationObserver` (the server's metrics) is told, on this thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Protocol

from edgetp.net.transport import ClusterError
from edgetp.serve.errors import APIError, bad_request, shutting_down
from edgetp.serve.jobs import Failed, Finished, GenerationCancelled, Job, RequestRecord

if TYPE_CHECKING:
    from edgetp.runtime.engine import GenerationResult
    from edgetp.runtime.master import Master

log = logging.getLogger("edgetp.serve.generation")


class GenerationObserver(Protocol):
    def finished(self, job: Job, result: GenerationResult) -> None:
        """``job`` completed with ``result`` (called on the generation thread, between jobs)."""


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
        self._current: Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edgetp-generation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Answer every queued job, stop the running generation and let the thread end."""
        with self.lock:
            self._stopping = True
            while self._pending:
                job = self._pending.popleft()
                self._finish(job, "shutdown")
                job.emit(Failed(shutting_down()))
            if self._current is not None:
                self._current.cancel("the server is shutting down")
            self.lock.notify_all()

    def join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def snapshot(self) -> tuple[int, bool, dict[str, int]]:
        """The queue's length, whether a generation runs, and the outcome counts."""
        with self.lock:
            return len(self._pending), self._current is not None, dict(self.stats)

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
        while True:
            with self.lock:
                while not self._pending and not self._stopping:
                    self.lock.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                self._current = job
            result = None
            try:
                result = self._run(job)
            finally:
                with self.lock:
                    self._current = None
                    self.lock.notify_all()
            if result is not None and self.observer is not None:
                self.observer.finished(job, result)  # the job is answered and off the cluster

    def _run(self, job: Job) -> GenerationResult | None:
        """Generate ``job``'s answer and emit its events; its result, None if it failed."""
        record = job.record
        record.started_at = time.monotonic()
        record.outcome = "running"
        record.completion_tokens = 0
        try:
            if job.cancelled.is_set():
                raise GenerationCancelled(job.cancel_reason)
            result = self.master.engine.generate(job.prompt_ids, job.sampling, job.gen,
                                                 job.on_text)
        except Exception as exc:  # noqa: BLE001 - every job gets an answer
            job.emit(Failed(self._failure(job, exc)))
        else:
            self._finish(job, "completed", result)
            log.info("%s: %d prompt tokens, %d generated (%s), %.0f ms", job.id,
                     result.prompt_tokens, len(result.token_ids), result.finish_reason,
                     (time.monotonic() - record.started_at) * 1000)
            job.emit(Finished(result))
            return result
        return None

    def _failure(self, job: Job, exc: Exception) -> APIError:
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
