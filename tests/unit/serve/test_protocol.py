"""The API's request bodies: validated by the protocol models, refused in OpenAI's error shape.

Every refusal is a 400 whose ``param`` is OpenAI's path of the wrong field and whose message
says what is wrong and what the field may be. A valid body becomes the sampling and stopping
settings of its job, the server's defaults filling what it leaves out. The checks that need
the model (its name, vocabulary and context) run on the demo model's master.
"""

from __future__ import annotations

from typing import Any

import pytest

from edgetp.config.generation import SamplingConfig
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt
from edgetp.runtime.master import Master
from edgetp.serve.errors import APIError
from edgetp.serve.intake import build_job
from edgetp.serve.jobs import JobKind
from edgetp.serve.protocol import ChatCompletionRequest, CompletionRequest
from edgetp.serve.settings import ServerSettings
from edgetp.serve.validation import validate_request

MODEL = "edgetp-demo"
MESSAGES = [{"role": "user", "content": demo_prompt(3, 5)}]


@pytest.fixture(scope="module")
def master() -> Master:
    return Master.local(DEMO_MODEL_DIR)


def chat_error(**fields: Any) -> APIError:
    """The error a chat request with ``fields`` (over a valid request) is refused with."""
    body = {"model": MODEL, "messages": MESSAGES, **fields}
    with pytest.raises(APIError) as info:
        validate_request(ChatCompletionRequest, body)
    return info.value


def completion_error(**fields: Any) -> APIError:
    body = {"model": MODEL, "prompt": demo_prompt(3, 5), **fields}
    with pytest.raises(APIError) as info:
        validate_request(CompletionRequest, body)
    return info.value


def assert_refused(error: APIError, param: str, message: str,
                   code: str | None = None) -> None:
    assert (error.status, error.type) == (400, "invalid_request_error")
    assert error.param == param
    assert error.message == message
    assert error.code == code
    assert error.body() == {"error": {"message": message, "type": "invalid_request_error",
                                      "param": param, "code": code}}


# -- types and ranges -------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "param", "message"), [
    ({"temperature": "hot"}, "temperature", "temperature must be a number, got 'hot'"),
    ({"temperature": True}, "temperature", "temperature must be a number, got True"),
    ({"temperature": float("nan")}, "temperature", "temperature must be a number, got nan"),
    ({"temperature": 5}, "temperature", "temperature must be in [0, 2], got 5"),
    ({"temperature": -0.5}, "temperature", "temperature must be in [0, 2], got -0.5"),
    ({"top_p": 0}, "top_p", "top_p must be in (0, 1], got 0"),
    ({"top_p": 1.5}, "top_p", "top_p must be in (0, 1], got 1.5"),
    ({"top_k": -2}, "top_k", "top_k must be >= -1, got -2"),
    ({"top_k": 1.5}, "top_k", "top_k must be an integer, got 1.5"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty must be > 0, got 0"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be >= 1, got 0"),
    ({"max_tokens": "ten"}, "max_tokens", "max_tokens must be an integer, got 'ten'"),
    ({"max_tokens": 10.0}, "max_tokens", "max_tokens must be an integer, got 10.0"),
    ({"max_completion_tokens": -1}, "max_completion_tokens",
     "max_completion_tokens must be >= 1, got -1"),
    ({"seed": "42"}, "seed", "seed must be an integer, got '42'"),
    ({"stream": "yes"}, "stream", "stream must be a boolean, got 'yes'"),
    ({"stream_options": "usage"}, "stream_options",
     "stream_options must be an object, got 'usage'"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage",
     "stream_options.include_usage must be a boolean, got 'yes'"),
    ({"stop": [1, 2]}, "stop", "stop must be a string or a list of strings"),
    ({"stop": 7}, "stop", "stop must be a string or a list of strings"),
    ({"n": 2}, "n", "n must be 1 (one sequence per request), got 2"),
    ({"model": 4}, "model", "model must be a string, got 4"),
])
def test_a_wrong_field_is_named_with_what_it_may_be(fields: dict[str, Any], param: str,
                                                      message: str) -> None:
    assert_refused(chat_error(**fields), param, message)
    assert_refused(completion_error(**fields), param, message)


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"best_of": 3}, "best_of"),
])
def test_fields_the_server_cannot_honour_are_refused(fields: dict[str, Any],
                                                     param: str) -> None:
    assert_refused(chat_error(**fields), param, f"{param} is not supported by this server",
                   "unsupported_parameter")


def test_fields_that_ask_for_nothing_or_are_unknown_pass() -> None:
    request = validate_request(ChatCompletionRequest, {
        "model": MODEL, "messages": MESSAGES, "tools": [], "logit_bias": {}, "logprobs": False,
        "presence_penalty": 0, "frequency_penalty": 0.0, "best_of": 1, "n": 1,
        "response_format": {"type": "text"}, "user": "someone", "metadata": {"a": "b"}})
    assert request.conversation() == MESSAGES
    error = chat_error(response_format={"type": "json_object"})
    assert_refused(error, "response_format",
                   'response_format is not supported except {"type": "text"}',
                   "unsupported_parameter")


# -- messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("messages", "param", "message"), [
    ([], "messages", "messages must be a non-empty list"),
    ("hello", "messages", "messages must be a list, got 'hello'"),
    (["hello"], "messages.[0]", "messages[0] must be an object, got 'hello'"),
    ([{"role": "wizard", "content": "hi"}], "messages.[0].role",
     "messages[0].role must be one of 'system', 'developer', 'user', 'assistant' or 'tool', "
     "got 'wizard'"),
    ([{"content": "hi"}], "messages.[0].role", "messages[0].role is required"),
    ([{"role": "user", "content": "hi"}, {"role": "user"}], "messages.[1].content",
     "messages[1].content is required"),
    ([{"role": "user", "content": 5}], "messages.[0].content",
     "messages[0].content must be a string or a list of text parts, got 5"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages.[0].content", 'messages[0].content must be a list of text parts ({"type": '
     '"text", "text": ...}): only text parts are supported'),
])
def test_a_wrong_message_is_named_by_its_index(messages: Any, param: str, message: str) -> None:
    assert_refused(chat_error(messages=messages), param, message)


def test_missing_messages_or_prompt() -> None:
    with pytest.raises(APIError) as info:
        validate_request(ChatCompletionRequest, {"model": MODEL})
    assert_refused(info.value, "messages", "you must provide a `messages` parameter")
    for body in ({"model": MODEL}, {"model": MODEL, "prompt": None}):
        with pytest.raises(APIError) as info:
            validate_request(CompletionRequest, body)
        assert_refused(info.value, "prompt", "you must provide a `prompt` parameter")


def test_messages_become_the_templates_conversation() -> None:
    request = validate_request(ChatCompletionRequest, {"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "count "},
                                     {"type": "text", "text": "by 3"}], "name": "me"},
        {"role": "assistant", "content": None, "tool_calls": []},
    ]})
    assert request.conversation() == [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "count by 3"},
                                      {"role": "assistant", "content": ""}]


# -- prompts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "expected"), [
    ("count", "count"), (["count"], "count"), ([5, 6], [5, 6]), ([[5, 6]], [5, 6]),
])
def test_a_prompt_is_text_or_token_ids_or_a_batch_of_one(prompt: Any, expected: Any) -> None:
    assert validate_request(CompletionRequest, {"prompt": prompt}).prompt == expected


@pytest.mark.parametrize(("prompt", "message"), [
    (["one", "two"], "prompt holds several prompts: only one prompt per request is supported"),
    ([[1], [2]], "prompt holds several prompts: only one prompt per request is supported"),
    ([], "prompt must be a string, a list of token ids, or a list of one of them"),
    (7, "prompt must be a string, a list of token ids, or a list of one of them"),
    ([1, "two"], "prompt must be a string, a list of token ids, or a list of one of them"),
    ([True], "prompt must be a string, a list of token ids, or a list of one of them"),
])
def test_a_wrong_prompt(prompt: Any, message: str) -> None:
    assert_refused(completion_error(prompt=prompt), "prompt", message)


@pytest.mark.parametrize(("fields", "param"), [
    ({"echo": True}, "echo"), ({"suffix": "!"}, "suffix"), ({"logprobs": 2}, "logprobs"),
])
def test_completion_fields_the_server_cannot_honour(fields: dict[str, Any], param: str) -> None:
    assert_refused(completion_error(**fields), param, f"{param} is not supported by this server",
                   "unsupported_parameter")


# -- from a valid body to a job ---------------------------------------------------------------


def job_of(master: Master, kind: JobKind, settings: ServerSettings | None = None,
           **fields: Any) -> Any:
    body = {"model": MODEL, **fields}
    return build_job(kind, body, settings or ServerSettings(MODEL), master)


def test_defaults_fill_what_a_request_leaves_out(master: Master) -> None:
    defaults = SamplingConfig(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1,
                              seed=3)
    settings = ServerSettings(MODEL, default_max_tokens=20, default_sampling=defaults,
                              stop_strings=("END",))
    job = job_of(master, "chat", settings, messages=MESSAGES)
    assert job.sampling == defaults
    assert (job.gen.max_new_tokens, job.gen.stop_strings) == (20, ("END",))
    assert (job.stream, job.include_usage) == (False, False)
    job = job_of(master, "completion", settings, prompt="count", temperature=0, top_k=-1,
                 top_p=1, repetition_penalty=1, seed=9, max_completion_tokens=7, stop="x",
                 stream=True, stream_options={"include_usage": True})
    assert job.sampling == SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, seed=9)
    assert (job.gen.max_new_tokens, job.gen.stop_strings) == (7, ("x", "END"))
    assert (job.stream, job.include_usage) == (True, True)
    job = job_of(master, "completion", prompt="count", max_tokens=5, max_completion_tokens=7,
                 stop=["a", "b"], stream_options={"include_usage": True})
    assert (job.gen.max_new_tokens, job.gen.stop_strings) == (5, ("a", "b"))
    assert job.include_usage is False  # usage is a stream's last chunk


def test_the_prompt_must_suit_the_served_model(master: Master) -> None:
    with pytest.raises(APIError) as info:
        job_of(master, "chat", messages=MESSAGES, **{"model": "gpt-4o"})
    error = info.value
    assert (error.status, error.param, error.code) == (404, "model", "model_not_found")
    assert error.message == f"The model `gpt-4o` does not exist; this server serves `{MODEL}`"
    vocab = master.tokenizer.vocab_size
    with pytest.raises(APIError) as info:
        job_of(master, "completion", prompt=[1, vocab])
    assert_refused(info.value, "prompt", f"prompt token ids must be in [0, {vocab})")
    with pytest.raises(APIError) as info:
        job_of(master, "completion", prompt=[1] * master.max_seq_len)
    assert_refused(info.value, "prompt", f"the prompt has {master.max_seq_len} tokens; this "
                   f"model's context is {master.max_seq_len} tokens", "context_length_exceeded")
    ids = master.tokenizer.encode(demo_prompt(3, 5))
    assert job_of(master, "completion", prompt=ids).prompt_ids == ids


# -- bounds that keep one request from hurting the server -------------------------------------


@pytest.mark.parametrize(("fields", "param", "message"), [
    ({"seed": 2**64}, "seed",
     "seed must fit in 64 bits (from -2**63 to 2**64 - 1), got 18446744073709551616"),
    ({"seed": -(2**63) - 1}, "seed",
     "seed must fit in 64 bits (from -2**63 to 2**64 - 1), got -9223372036854775809"),
    ({"repetition_penalty": 1e300}, "repetition_penalty",
     "repetition_penalty must be in [0.01, 100], got 1e+300"),
    ({"repetition_penalty": 0.001}, "repetition_penalty",
     "repetition_penalty must be in [0.01, 100], got 0.001"),
    ({"stop": ["."] * 17}, "stop", "stop must have at most 16 strings, got 17"),
    ({"stop": "x" * 257}, "stop",
     "stop strings must be at most 256 characters long, got one of 257"),
    ({"stop": ["ok", "\udc00"]}, "stop",
     "stop holds a lone UTF-16 surrogate ('\\udc00') at character 0: send valid Unicode"),
    ({"messages": [{"role": "user", "content": "ab\ud800"}]}, "messages.[0].content",
     "messages[0].content holds a lone UTF-16 surrogate ('\\ud800') at character 2: send "
     "valid Unicode"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]},
     "messages.[0].content", "messages[0].content holds a lone UTF-16 surrogate ('\\ud83d') at "
     "character 0: send valid Unicode"),
    ({"temperature": "t" * 500}, "temperature",
     "temperature must be a number, got '" + "t" * 99 + "... (502 characters)"),
])
def test_bounds_on_what_a_request_may_ask(fields: dict[str, Any], param: str,
                                          message: str) -> None:
    assert_refused(chat_error(**fields), param, message)


def test_the_edges_of_the_bounds_pass() -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "🙂 é"}],
            "seed": 2**64 - 1, "repetition_penalty": 100, "stop": ["y" * 256] * 16}
    request = validate_request(ChatCompletionRequest, body)
    assert request.sampling(SamplingConfig()).seed == 2**64 - 1
    assert validate_request(CompletionRequest, {"prompt": "x", "seed": -(2**63)}).seed == -(2**63)
    error = completion_error(prompt="count \udfff")
    assert (error.param, error.message) == (
        "prompt", "prompt holds a lone UTF-16 surrogate ('\\udfff') at character 6: send valid "
        "Unicode")
