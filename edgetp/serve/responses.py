"""The bodies the API answers a job with: a whole completion, or its stream of chunks.

OpenAI's shapes: ``chat.completion`` / ``text_completion`` objects, and for ``stream: true``
server-sent events of ``chat.completion.chunk`` / ``text_completion`` chunks ending in
``data: [DONE]``. Nothing here knows about sockets: :func:`stream_events` turns a job's events
into the bytes of its event stream, for whichever HTTP layer writes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from edgetp.runtime.engine import GenerationResult
from edgetp.serve.jobs import Job

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


def usage(result: GenerationResult) -> dict[str, int]:
    completion = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion}


def completion_body(job: Job, model: str, result: GenerationResult) -> dict[str, Any]:
    reason = FINISH_REASONS[result.finish_reason]
    if job.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant",
                                                          "content": result.text},
                                  "logprobs": None, "finish_reason": reason}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": reason}
        kind = "text_completion"
    return {"id": job.id, "object": kind, "created": job.created, "model": model,
            "system_fingerprint": None, "choices": [choice], "usage": usage(result)}


def chunk_body(job: Job, model: str, text: str | None, finish_reason: str | None = None,
               first: bool = False) -> dict[str, Any]:
    """One streamed chunk; ``text=None`` with a finish reason is the closing chunk."""
    if job.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else (
            {"content": text} if text is not None else {})
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                  "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason}
        kind = "text_completion"
    body = {"id": job.id, "object": kind, "created": job.created, "model": model,
            "system_fingerprint": None, "choices": [choice]}
    if job.include_usage:
        body["usage"] = None
    return body


def sse(data: Any) -> bytes:
    """One server-sent event carrying ``data`` (JSON, or a string as it is)."""
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n".encode()


def stream_events(job: Job, model: str, events: Iterator[tuple[str, Any]]) -> Iterator[bytes]:
    """The event stream of ``job``, one server-sent event per item, ``[DONE]`` last.

    ``events`` yields the job's events; the stream starts after the first one (so an error
    before any text is answered with its status by the caller, not here).
    """
    if job.kind == "chat":  # OpenAI's first chunk names the role
        yield sse(chunk_body(job, model, "", first=True))
    for kind, value in events:
        if kind == "text":
            yield sse(chunk_body(job, model, value))
            continue
        if kind == "done":
            reason = FINISH_REASONS[value.finish_reason]
            yield sse(chunk_body(job, model, None, reason))
            if job.include_usage:
                closing = chunk_body(job, model, None)
                closing.update(choices=[], usage=usage(value))
                yield sse(closing)
        else:  # an error after the stream began: an error event, as OpenAI sends them
            yield sse(value.body())
        break
    yield sse("[DONE]")
