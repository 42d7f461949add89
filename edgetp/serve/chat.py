"""An interactive terminal chat (``edgetp chat``): history, the chat template, streamed replies.

Two backends answer the conversation: :class:`LocalChat` runs a
:class:`~edgetp.runtime.master.Master` in this process (one process or a local cluster),
:class:`RemoteChat` talks to a running ``edgetp serve`` (or any OpenAI-compatible server)
through its streaming chat API, with the official ``openai`` client.

:func:`run_chat` reads one user message per line. ``/reset`` clears the history, ``/exit``
(or end of input) quits, ``/help`` lists the commands. Replies stream to ``output`` as they
are generated; notices and errors go to ``errors``. Ctrl-C during a reply stops that reply.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TextIO, cast
from urllib.parse import urlsplit

import openai

from edgetp.core.errors import ConfigError, EdgetpError

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

    from edgetp.runtime.master import Master

COMMANDS = "/reset clears the history, /exit quits, /help shows this"


class ChatError(EdgetpError, RuntimeError):
    """A reply failed (the server refused the request, the cluster failed, ...)."""


class ChatCancelled(Exception):
    """Raised from the text callback to stop a reply (Ctrl-C)."""


@dataclass
class Reply:
    text: str
    finish_reason: str  # OpenAI's: "stop" | "length"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


class ChatBackend(Protocol):
    def reply(self, messages: list[dict[str, str]], on_text: Callable[[str], None]) -> Reply:
        """Generate the assistant's next message, passing text pieces to ``on_text``."""


@dataclass(frozen=True)
class ChatOptions:
    """Sampling and stopping settings of every reply."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


class LocalChat:
    """Replies from a master in this process (its tokenizer's chat template, its engine)."""

    def __init__(self, master: Master, options: ChatOptions) -> None:
        from edgetp.config.generation import GenerationConfig, SamplingConfig

        self.master = master
        self.sampling = SamplingConfig(temperature=options.temperature, top_k=options.top_k,
                                       top_p=options.top_p,
                                       repetition_penalty=options.repetition_penalty,
                                       seed=options.seed)
        self.gen = GenerationConfig(max_new_tokens=options.max_tokens,
                                    stop_strings=options.stop)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.master.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                        tokenize=True)
        assert isinstance(ids, list)  # tokenize=True
        return ids

    def reply(self, messages: list[dict[str, str]], on_text: Callable[[str], None]) -> Reply:
        result = self.master.engine.generate(self.prompt_ids(messages), self.sampling, self.gen,
                                             on_text)
        reason = "stop" if result.finish_reason in ("eos", "stop") else "length"
        return Reply(result.text, reason, result.prompt_tokens, len(result.token_ids))


class RemoteChat:
    """Replies from ``edgetp serve`` (or any OpenAI-compatible server) at ``url``."""

    def __init__(self, url: str, options: ChatOptions, api_key: str | None = None,
                 model: str | None = None, timeout_s: float = 600.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"cannot use {url!r} as a server URL; write e.g. "
                              "http://127.0.0.1:8000")
        base = parts.path.rstrip("/").removesuffix("/v1")
        self.url = f"{parts.scheme}://{parts.netloc}{base}"
        self.options = options
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or "unused",
                                    max_retries=0, timeout=timeout_s)
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        with _chat_failures(self.url):
            models = self.client.models.list().data
        if not models:
            raise ChatError(f"{self.url}/v1/models did not list a model")
        return models[0].id

    def extra_body(self) -> dict[str, Any] | None:
        """The sampling settings beyond OpenAI's fields (edgetp's extensions)."""
        o = self.options
        extra: dict[str, Any] = {}
        if o.top_k:
            extra["top_k"] = o.top_k
        if o.repetition_penalty != 1.0:
            extra["repetition_penalty"] = o.repetition_penalty
        return extra or None

    def reply(self, messages: list[dict[str, str]], on_text: Callable[[str], None]) -> Reply:
        pieces: list[str] = []
        reply = Reply("", "stop")
        with _chat_failures(self.url):
            o = self.options
            stream = self.client.chat.completions.create(
                model=self.model, messages=cast("list[ChatCompletionMessageParam]", messages),
                stream=True,
                stream_options={"include_usage": True}, max_tokens=o.max_tokens,
                temperature=o.temperature, top_p=o.top_p, seed=o.seed,
                stop=list(o.stop) or None, extra_body=self.extra_body())
            with stream:  # leaving it closes the connection: how a cancelled reply stops
                ended = False
                for chunk in stream:
                    ended |= _take_chunk(chunk, reply, pieces, on_text)
            if not ended:
                raise ChatError("the server closed the stream before it ended")
        reply.text = "".join(pieces)
        return reply

def _take_chunk(chunk: ChatCompletionChunk, reply: Reply, pieces: list[str],
                on_text: Callable[[str], None]) -> bool:
    """Add a streamed chunk to ``reply``; True if it carried the finish reason."""
    if chunk.usage is not None:
        reply.prompt_tokens = chunk.usage.prompt_tokens
        reply.completion_tokens = chunk.usage.completion_tokens
    finished = False
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
            on_text(choice.delta.content)
        if choice.finish_reason:
            reply.finish_reason = choice.finish_reason
            finished = True
    return finished


@contextlib.contextmanager
def _chat_failures(url: str) -> Iterator[None]:
    """Turn the openai client's errors into ChatErrors that say what happened."""
    try:
        yield
    except openai.APIStatusError as exc:
        raise ChatError(f"the server answered {exc.status_code}: {_error_message(exc)}") from exc
    except openai.APIConnectionError as exc:
        raise ChatError(f"cannot reach the server at {url}: {exc}") from exc
    except openai.APIError as exc:  # an error event in the stream
        raise ChatError(exc.message) from exc


def _error_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return exc.message


def run_chat(backend: ChatBackend, input: TextIO, output: TextIO, errors: TextIO,  # noqa: A002
             system: str | None = None, json_output: bool = False) -> int:
    """The conversation loop; returns the number of replies that failed."""
    interactive = input.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing for input()
        except ImportError:
            pass
        errors.write(f"chat with the model; {COMMANDS}\n")
        errors.flush()
    history: list[dict[str, str]] = []
    failures = 0
    while True:
        try:
            line = input_line(input, output, interactive)
        except KeyboardInterrupt:
            output.write("\n")
            break
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                history.clear()
                errors.write("(history cleared)\n")
            else:
                errors.write(f"commands: {COMMANDS}\n")
            errors.flush()
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": line.rstrip("\r\n")})
        reply, failed = _reply(backend, messages, output, errors, json_output)
        failures += failed
        if reply is None:
            continue
        history += [messages[-1], {"role": "assistant", "content": reply.text}]
    return failures


def input_line(input: TextIO, output: TextIO, interactive: bool) -> str | None:  # noqa: A002
    if interactive:
        output.write("you> ")
        output.flush()
    line = input.readline()
    return line if line else None


def _reply(backend: ChatBackend, messages: list[dict[str, str]], output: TextIO,
           errors: TextIO, json_output: bool) -> tuple[Reply | None, bool]:
    """Run one reply in a thread (so Ctrl-C can stop it between tokens) and print it.

    Returns the reply (None if it failed or was interrupted) and whether it failed.
    """
    cancel = threading.Event()
    outcome: dict[str, Any] = {}

    def on_text(piece: str) -> None:
        if cancel.is_set():
            raise ChatCancelled()
        if piece and not json_output:
            output.write(piece)
            output.flush()

    def body() -> None:
        try:
            outcome["reply"] = backend.reply(messages, on_text)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            outcome["error"] = exc

    thread = threading.Thread(target=body, name="edgetp-chat-reply", daemon=True)
    thread.start()
    while thread.is_alive():
        try:
            thread.join(0.1)
        except KeyboardInterrupt:
            cancel.set()
    error = outcome.get("error")
    reply: Reply | None = outcome.get("reply")
    if reply is not None and json_output:
        output.write(json.dumps(reply.to_json()) + "\n")
    elif reply is not None or isinstance(error, ChatCancelled):
        output.write("\n")
    output.flush()
    if isinstance(error, ChatCancelled):
        errors.write("(reply interrupted; it is not kept in the history)\n")
    elif error is not None:
        errors.write(f"error: {error}\n")
    errors.flush()
    return reply, error is not None and not isinstance(error, ChatCancelled)
