"""From a request body to a :class:`~edgetp.serve.jobs.Job`: checked, tokenized, fitted.

The two completion endpoints share the sampling, stopping and streaming fields
(:func:`parse_common`); a chat request carries ``messages`` rendered with the model's chat
template, a completion request a ``prompt`` (text or token ids). A request that cannot be
served is answered with an :class:`~edgetp.serve.errors.APIError` naming the field to fix.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.serve.errors import APIError, bad_request
from edgetp.serve.jobs import Job, JobKind
from edgetp.serve.settings import ServerSettings

if TYPE_CHECKING:
    from edgetp.runtime.master import Master

ROLES = ("system", "developer", "user", "assistant", "tool")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number, got {value!r}", name)
    if value < low or (low_open and value == low) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad_request(f"{name} must be in {interval}, got {value!r}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise bad_request(f"{name} must be an integer, got {value!r}", name)
    if value < minimum:
        raise bad_request(f"{name} must be >= {minimum}, got {value}", name)
    return int(value)


def _unsupported(body: dict[str, Any], name: str, allowed: tuple[Any, ...] = (None,)) -> None:
    value = body.get(name)
    if value in allowed or (isinstance(value, list | dict) and not value):
        return
    raise bad_request(f"{name} is not supported by this server", name, "unsupported_parameter")


def parse_common(body: dict[str, Any], settings: ServerSettings
                 ) -> tuple[SamplingConfig, GenerationConfig, bool, bool]:
    """Sampling, stopping and streaming settings shared by both completion endpoints."""
    model = body.get("model")
    if model is not None and model != settings.model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves "
                       f"`{settings.model_name}`", "invalid_request_error", "model",
                       "model_not_found")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad_request(f"n must be 1 (one sequence per request), got {n!r}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        _unsupported(body, name, (None, 0, 0.0))
    _unsupported(body, "logit_bias")
    _unsupported(body, "best_of", (None, 1))
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request(f"stream must be a boolean, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    include_usage = bool(stream and options and options.get("include_usage"))
    base = settings.default_sampling
    top_k = _integer(body, "top_k", base.top_k, -1)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad_request(f"seed must be an integer, got {seed!r}", "seed")
    sampling = SamplingConfig(
        temperature=_number(body, "temperature", base.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", base.top_p, 0.0, 1.0, low_open=True),
        top_k=max(0, top_k or 0),
        repetition_penalty=_number(body, "repetition_penalty", base.repetition_penalty,
                                   0.0, math.inf, low_open=True),
        seed=base.seed if seed is None else seed,
    )
    max_tokens = _integer(body, "max_completion_tokens", None, 1)
    max_tokens = _integer(body, "max_tokens", max_tokens or settings.default_max_tokens, 1)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad_request("stop must be a string or a list of strings", "stop")
    gen = GenerationConfig(max_new_tokens=int(max_tokens or 1),
                           stop_strings=tuple(stops) + settings.stop_strings)
    return sampling, gen, stream, include_usage


def _message_text(content: Any, index: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{index}].content: only text parts are supported",
                                  f"messages.[{index}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"messages[{index}].content must be a string or a list of text parts",
                      f"messages.[{index}].content")


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation, checked and reduced to ``{"role", "content"}`` dicts for the template."""
    if "messages" not in body:
        raise bad_request("you must provide a `messages` parameter", "messages")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object", f"messages.[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}, got "
                              f"{role!r}", f"messages.[{i}].role")
        text = _message_text(message.get("content"), i)
        if text is None and role != "assistant":
            raise bad_request(f"messages[{i}].content is required", f"messages.[{i}].content")
        out.append({"role": "system" if role == "developer" else role, "content": text or ""})
    return out


def parse_prompt(body: dict[str, Any], tokenizer: Any) -> list[int]:
    """The token ids of a completion's ``prompt``: a string or token ids, one prompt only."""
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("you must provide a `prompt` parameter", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        vocab = tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request("only one prompt per request is supported", "prompt")
    raise bad_request("prompt must be a string, a list of token ids, or a list of one of them",
                      "prompt")


def build_job(kind: JobKind, body: dict[str, Any], settings: ServerSettings,
              master: Master) -> Job:
    """The job of a request body, or the APIError to answer it with."""
    sampling, gen, stream, include_usage = parse_common(body, settings)
    tokenizer = master.tokenizer
    if kind == "chat":
        _unsupported(body, "tools")
        _unsupported(body, "functions")
        _unsupported(body, "logprobs", (None, False))
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise bad_request("response_format: only {\"type\": \"text\"} is supported",
                              "response_format", "unsupported_parameter")
        messages = parse_messages(body)
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True)
        except ValueError as exc:
            raise bad_request(str(exc), "messages") from exc
        assert isinstance(ids, list)  # tokenize=True
    else:
        _unsupported(body, "logprobs")
        _unsupported(body, "echo", (None, False))
        _unsupported(body, "suffix", (None, ""))
        ids = parse_prompt(body, tokenizer)
    if not ids:
        raise bad_request("the prompt is empty", "messages" if kind == "chat" else "prompt")
    context = master.max_seq_len
    if len(ids) >= context:
        raise bad_request(f"the prompt has {len(ids)} tokens; this model's context is "
                          f"{context} tokens", "messages" if kind == "chat" else "prompt",
                          "context_length_exceeded")
    return Job(kind, list(ids), sampling, gen, stream, include_usage)
