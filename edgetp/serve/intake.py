"""From a request body to a :class:`~edgetp.serve.jobs.Job`: parsed, validated, tokenized,
fitted.

The body must be a JSON object (:func:`parse_body`); it is validated against its protocol
model (:mod:`edgetp.serve.protocol`); then the model it names must be the one served, a
chat's ``messages`` are rendered with the model's chat template (in a sandbox, its output
bounded), and the prompt must leave room in the context. A prompt whose text surely has too
many tokens (:meth:`Tokenizer.token_floor`) is refused before it is encoded, since encoding
megabytes takes seconds; token ids are checked against the vocabulary. A request that cannot
be served is answered with an
:class:`~edgetp.serve.errors.APIError` naming the field to fix.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from edgetp.model.tokenizer import ChatTemplateTooLong
from edgetp.serve.errors import bad_request, model_not_found
from edgetp.serve.jobs import Job, JobKind
from edgetp.serve.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from edgetp.serve.settings import ServerSettings
from edgetp.serve.validation import validate_request

if TYPE_CHECKING:
    from edgetp.model.tokenizer import Tokenizer
    from edgetp.runtime.master import Master


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body, or the 400 to answer it with."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    return data


def build_job(kind: JobKind, body: dict[str, Any], settings: ServerSettings,
              master: Master) -> Job:
    """The job of a request body, or the APIError to answer it with."""
    request: GenerationRequest
    context = master.max_seq_len
    if kind == "chat":
        request = validate_request(ChatCompletionRequest, body)
    else:
        request = validate_request(CompletionRequest, body)
    if request.model is not None and request.model != settings.model_name:
        raise model_not_found(request.model, settings.model_name)
    if isinstance(request, ChatCompletionRequest):
        ids = chat_prompt_ids(request, master.tokenizer, context)
    else:
        ids = completion_prompt_ids(request, master.tokenizer, context)
    check_fits(ids, context, "messages" if kind == "chat" else "prompt")
    return Job(kind, ids, request.sampling(settings.default_sampling),
               request.generation(settings.default_max_tokens, settings.stop_strings),
               request.streams, request.include_usage)


def chat_prompt_ids(request: ChatCompletionRequest, tokenizer: Tokenizer,
                    context: int) -> list[int]:
    """The conversation rendered with the model's chat template, ready for the answer."""
    try:
        text = tokenizer.apply_chat_template(request.conversation(), add_generation_prompt=True)
    except ChatTemplateTooLong as exc:
        raise bad_request(f"the conversation is too long for this model's context of "
                          f"{context} tokens ({exc})", "messages",
                          "context_length_exceeded") from exc
    except ValueError as exc:  # no template, or the template refuses the conversation
        raise bad_request(str(exc), "messages") from exc
    assert isinstance(text, str)  # not tokenized
    return encode_fitting(text, tokenizer, context, "messages", add_special_tokens=False)


def completion_prompt_ids(request: CompletionRequest, tokenizer: Tokenizer,
                          context: int) -> list[int]:
    """The prompt's token ids: its text encoded, or its ids, each in the vocabulary."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return encode_fitting(prompt, tokenizer, context, "prompt")
    check_fits(prompt, context, "prompt")
    vocab = tokenizer.vocab_size
    if any(not 0 <= token < vocab for token in prompt):
        raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
    return list(prompt)


def encode_fitting(text: str, tokenizer: Tokenizer, context: int, param: str,
                   add_special_tokens: bool = True) -> list[int]:
    """``text`` encoded, unless it surely has too many tokens for ``context`` (found without
    encoding it, which takes seconds for megabytes)."""
    floor = tokenizer.token_floor(text, context)
    if floor >= context:
        raise bad_request(f"the prompt has at least {floor} tokens ({len(text)} characters); "
                          f"this model's context is {context} tokens", param,
                          "context_length_exceeded")
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def check_fits(ids: list[int], context: int, param: str) -> None:
    """The prompt must not be empty and must leave room for an answer in the context."""
    if not ids:
        raise bad_request("the prompt is empty", param)
    if len(ids) >= context:
        raise bad_request(f"the prompt has {len(ids)} tokens; this model's context is "
                          f"{context} tokens", param, "context_length_exceeded")
