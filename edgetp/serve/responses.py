"""The answers to a job: the whole completion, or its stream of chunks as server-sent events.

OpenAI's shapes (:mod:`edgetp.serve.protocol`): ``chat.completion`` / ``text_completion``
objects, and for ``stream: true`` ``chat.completion.chunk`` / ``text_completion`` chunks
ending in ``data: [DONE]``. Nothing here knows about sockets: :func:`stream_head` and
:func:`stream_event` turn a job's events into the bytes of its event stream, for the HTTP
layer to write.
"""

from __future__ import annotations

import json
from typing import Any

from edgetp.runtime.engine import GenerationResult
from edgetp.serve.jobs import Finished, Job, JobEvent, TextPiece
from edgetp.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    FinishReason,
    TextChoice,
    TextCompletion,
    Usage,
)

FINISH_REASONS: dict[str, FinishReason] = {"eos": "stop", "stop": "stop", "length": "length",
                                           "context": "length"}


def usage(result: GenerationResult) -> Usage:
    completion = len(result.token_ids)
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=completion,
                 total_tokens=result.prompt_tokens + completion)


def completion_body(job: Job, model: str, result: GenerationResult) -> dict[str, Any]:
    """The answer to a request without ``stream``."""
    reason = FINISH_REASONS[result.finish_reason]
    answer: ChatCompletion | TextCompletion
    if job.kind == "chat":
        choice = ChatChoice(message=AssistantMessage(content=result.text), finish_reason=reason)
        answer = ChatCompletion(id=job.id, created=job.created, model=model, choices=[choice],
                                usage=usage(result))
    else:
        answer = TextCompletion(id=job.id, created=job.created, model=model, usage=usage(result),
                                choices=[TextChoice(text=result.text, finish_reason=reason)])
    return answer.model_dump()


def chunk_body(job: Job, model: str, text: str | None, finish_reason: FinishReason | None = None,
               first: bool = False, final_usage: Usage | None = None) -> dict[str, Any]:
    """One streamed chunk: the role (``first``), a piece of ``text``, the closing chunk
    (``text=None`` with a finish reason), or the token counts (``final_usage``, no choices).

    ``usage`` is in every chunk (null but in the last) only if the request asked for it.
    """
    chunk: ChatCompletionChunk | TextCompletion
    if job.kind == "chat":
        delta = ChatDelta(role="assistant", content=text or "") if first else ChatDelta(
            content=text)
        choices = [] if final_usage else [ChatChunkChoice(delta=delta,
                                                          finish_reason=finish_reason)]
        chunk = ChatCompletionChunk(id=job.id, created=job.created, model=model,
                                    choices=choices, usage=final_usage)
    else:
        pieces = [] if final_usage else [TextChoice(text=text or "", finish_reason=finish_reason)]
        chunk = TextCompletion(id=job.id, created=job.created, model=model, choices=pieces,
                               usage=final_usage)
    return chunk.model_dump(exclude=None if job.include_usage else {"usage"})


def sse(data: Any) -> bytes:
    """One server-sent event carrying ``data`` (JSON, or a string as it is)."""
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n".encode()


def stream_head(job: Job, model: str) -> list[bytes]:
    """The events a stream begins with, before its first piece: OpenAI's chat streams name the
    role in a first chunk."""
    return [sse(chunk_body(job, model, "", first=True))] if job.kind == "chat" else []


def stream_event(job: Job, model: str, event: JobEvent) -> list[bytes]:
    """The server-sent events of one of ``job``'s events; after its last event (not a
    :class:`TextPiece`), the closing chunks and ``[DONE]``.

    The caller starts the stream after the job's first event, so an error before any text is
    answered with its status, not here; an error after the stream began becomes an error
    event, as OpenAI sends them.
    """
    if isinstance(event, TextPiece):
        return [sse(chunk_body(job, model, event.text))]
    if isinstance(event, Finished):
        out = [sse(chunk_body(job, model, None, FINISH_REASONS[event.result.finish_reason]))]
        if job.include_usage:
            out.append(sse(chunk_body(job, model, None, final_usage=usage(event.result))))
    else:
        out = [sse(event.error.body())]
    return [*out, sse("[DONE]")]
