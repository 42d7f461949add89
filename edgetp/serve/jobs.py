"""One accepted request on its way through the server: :class:`Job` and its record.

A job is the seam between the HTTP side (coroutines on the server's event loop) and the
engine side (the generation thread): the HTTP side awaits its events
(:meth:`Job.next_event`), the engine side emits them from its own thread (:meth:`Job.emit`):
a :class:`TextPiece` per generated piece of a stream, then :class:`Finished` or
:class:`Failed`. :class:`RequestRecord` keeps what happened to the request (for ``/health``,
``/metrics``, logs and tests).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from edgetp.config.generation import GenerationConfig, SamplingConfig

if TYPE_CHECKING:
    from edgetp.runtime.engine import GenerationResult
    from edgetp.serve.errors import APIError

JobKind = Literal["chat", "completion"]


@dataclass(frozen=True)
class TextPiece:
    """A piece of a stream's text, as it is generated."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The generation ended: the whole result (the job's last event)."""

    result: GenerationResult


@dataclass(frozen=True)
class Failed:
    """The job failed or was cancelled: the error its client gets (the job's last event)."""

    error: APIError


JobEvent = TextPiece | Finished | Failed


class GenerationCancelled(Exception):
    """Raised from the text callback to stop a generation whose client is gone.

    Deliberately not a RuntimeError: nothing between the engine and the server catches it.
    """


@dataclass
class RequestRecord:
    """What happened to one accepted request (kept for /health, logs and tests)."""

    id: str
    kind: str  # "chat" | "completion"
    stream: bool
    max_tokens: int
    prompt_tokens: int
    queued_at: float  # when it entered the queue (set again by the queue's submit)
    started_at: float | None = None
    finished_at: float | None = None
    outcome: str = "queued"  # queued|running|completed|cancelled|skipped|failed|shutdown
    completion_tokens: int = 0  # tokens generated (also for a cancelled request)
    finish_reason: str | None = None


class Job:
    """One accepted request: the HTTP side awaits its events; the generation thread emits them.

    Events: :class:`TextPiece` (streams only), then :class:`Finished` or :class:`Failed`. The
    HTTP side calls :meth:`attach` with its event loop before the job is queued.
    """

    def __init__(self, kind: JobKind, prompt_ids: list[int], sampling: SamplingConfig,
                 gen: GenerationConfig, stream: bool, include_usage: bool = False) -> None:
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.kind = kind
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.gen = gen
        self.stream = stream
        self.include_usage = include_usage
        self.created = int(time.time())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: asyncio.Queue[JobEvent] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.cancel_reason = ""
        self.record = RequestRecord(self.id, kind, stream, gen.max_new_tokens, len(prompt_ids),
                                    time.monotonic())

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver the events to coroutines running on ``loop``."""
        self._loop = loop

    def emit(self, event: JobEvent) -> None:
        """Hand ``event`` to the HTTP side (from any thread)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError(f"{self.id} was queued before it was attached to an event loop")
        try:
            loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server stopped, nobody waits any more
            pass

    async def next_event(self) -> JobEvent:
        """The job's next event (on the attached loop)."""
        return await self._events.get()

    def cancel(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()

    def on_text(self, piece: str) -> None:
        """The engine's callback, called once per generated token (and once at the end)."""
        self.record.completion_tokens += 1
        if self.cancelled.is_set():
            raise GenerationCancelled(self.cancel_reason)
        if self.stream and piece:
            self.emit(TextPiece(piece))
