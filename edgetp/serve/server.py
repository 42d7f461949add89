"""An OpenAI-compatible HTTP API on the master (``edgetp serve``).

The server runs on the master only: request bodies (prompts, messages, sampling settings) and
the generated text never leave this process; the workers keep receiving hidden states only.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both with ``stream: true`` as server-sent events in OpenAI's
format) and ``GET /health``. Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.

A cluster computes one sequence at a time, so requests wait in a bounded FIFO queue that one
generation thread drains. The HTTP threads only parse, tokenize, queue and write; the
generation thread never touches a socket. A request that does not fit in the queue gets 429;
every accepted request ends in a response or an error. A client that goes away is noticed
(a failed write, or end-of-file on its socket) and its generation is stopped between two
steps, or, if it is still queued, it is dropped from the queue.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import queue
import select
import signal
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.core.errors import ConfigError
from edgetp.net.transport import ClusterError
from edgetp.runtime.engine import GenerationResult
from edgetp.shard.layout import rank_of

log = logging.getLogger("edgetp.serve.server")

MAX_BODY_BYTES = 8 << 20
POLL_S = 0.05  # how often a waiting request checks whether its client is still there
ROLES = ("system", "developer", "user", "assistant", "tool")
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


class GenerationCancelled(Exception):
    """Raised from the text callback to stop a generation whose client is gone.

    Deliberately not a RuntimeError: nothing between the engine and the server catches it.
    """


@dataclass(frozen=True)
class ServerSettings:
    """What the server serves and how.

    ``default_max_tokens`` and ``default_sampling`` apply to the fields a request leaves out;
    ``stop_strings`` are added to every request's ``stop``.
    """

    model_name: str
    api_key: str | None = None
    queue_size: int = 16
    default_max_tokens: int = 64
    default_sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ConfigError(f"the queue size must be >= 1, got {self.queue_size}")
        if self.default_max_tokens < 1:
            raise ConfigError(f"max tokens must be >= 1, got {self.default_max_tokens}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("the API key must not be empty")


def default_model_name(path: str | Path) -> str:
    """The id clients use by default: the model directory's name (a shard's parent's name)."""
    path = Path(path).resolve()
    if rank_of(path) is not None and path.parent.name:
        return path.parent.name
    return path.name or "edgetp"


# -- requests ---------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """What happened to one accepted request (kept for /health, logs and tests)."""

    id: str
    kind: str  # "chat" | "completion"
    stream: bool
    max_tokens: int
    prompt_tokens: int
    queued_at: float
    started_at: float | None = None
    finished_at: float | None = None
    outcome: str = "queued"  # queued|running|completed|cancelled|skipped|failed|shutdown
    completion_tokens: int = 0  # tokens generated (also for a cancelled request)
    finish_reason: str | None = None


class Job:
    """One accepted request: the HTTP thread waits on ``events``; the generation thread fills it.

    Events: ``("text", piece)`` (streams only), then ``("done", GenerationResult)`` or
    ``("error", APIError)``.
    """

    def __init__(self, kind: str, prompt_ids: list[int], sampling: SamplingConfig,
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
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.cancel_reason = ""
        self.record = RequestRecord(self.id, kind, stream, gen.max_new_tokens, len(prompt_ids),
                                    time.monotonic())

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
            self.events.put(("text", piece))


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


# -- the service ------------------------------------------------------------------------------


class APIServer:
    """The HTTP server, the request queue and the generation thread around one master.

    ``master`` is an :class:`edgetp.runtime.master.Master` (local or cluster); the server is its only
    user while it runs. ``start()`` binds (``port=0`` picks a free port) and returns at once;
    ``stop()`` answers every queued request, stops the running generation and closes all
    connections.
    """

    def __init__(self, master: Any, settings: ServerSettings, host: str = "127.0.0.1",
                 port: int = 8000) -> None:
        self.master = master
        self.settings = settings
        self.host = host
        self.port = port
        self.started = int(time.time())
        self.stats: Counter[str] = Counter()
        self.records: deque[RequestRecord] = deque(maxlen=1000)
        self._cv = threading.Condition()
        self._pending: deque[Job] = deque()
        self._current: Job | None = None
        self._stopping = False
        self._active = 0  # HTTP requests being handled
        self._httpd: _HTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> APIServer:
        httpd_class = _HTTPServer6 if ":" in self.host else _HTTPServer
        self._httpd = httpd_class((self.host, self.port), _Handler)
        self._httpd.app = self
        self.port = int(self._httpd.server_address[1])
        self._threads = [
            threading.Thread(target=self._generation_loop, name="edgetp-generation",
                             daemon=True),
            threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                             name="edgetp-http", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        if not _is_loopback(self.host) and self.settings.api_key is None:
            log.warning("serving on %s without an API key: anyone who can reach this port can "
                        "use the model (set --api-key or EDGETP_API_KEY)", self.host)
        log.info("serving %s on %s (queue of %d)", self.settings.model_name, self.url,
                 self.settings.queue_size)
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        httpd = self._httpd
        if httpd is None:
            return
        httpd.shutdown()  # no new connections
        with self._cv:
            self._stopping = True
            while self._pending:
                job = self._pending.popleft()
                self._finish(job, "shutdown")
                job.events.put(("error", _shutting_down()))
            if self._current is not None:
                self._current.cancel("the server is shutting down")
            self._cv.notify_all()
            deadline = time.monotonic() + timeout_s
            while self._active and time.monotonic() < deadline:
                self._cv.wait(0.05)
        httpd.close_connections()
        httpd.server_close()
        for thread in self._threads:
            thread.join(timeout_s)
        self._httpd = None
        log.info("server stopped")

    def __enter__(self) -> APIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self) -> None:
        """Block until the process is interrupted (Ctrl-C or SIGTERM), then stop."""
        stop = threading.Event()
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.stop()

    # -- state ------------------------------------------------------------------------------

    def missing_ranks(self) -> list[int]:
        return self.master.missing_ranks()

    def expected_nodes(self) -> int:
        return self.master.n_ranks

    def health(self) -> dict[str, Any]:
        missing = self.missing_ranks()
        expected = self.expected_nodes()
        with self._cv:
            queued, busy = len(self._pending), self._current is not None
            requests = dict(self.stats)
        return {
            "status": "unavailable" if missing else "ok",
            "model": self.settings.model_name,
            "nodes": {"expected": expected, "joined": expected - len(missing),
                      "missing": missing},
            "queue": {"length": queued, "capacity": self.settings.queue_size},
            "busy": busy,
            "requests": requests,
        }

    # -- the queue --------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue ``job`` or raise the APIError to answer with (503, 429)."""
        missing = self.missing_ranks()
        with self._cv:
            if self._stopping:
                raise _shutting_down()
            if missing:
                self.stats["unavailable"] += 1
                raise APIError(503, f"the cluster is incomplete: worker rank(s) {missing} have "
                               "not joined the master; retry when they are back",
                               "server_error", None, "cluster_unavailable")
            if len(self._pending) >= self.settings.queue_size:
                self.stats["rejected"] += 1
                raise APIError(429, f"the server is busy: its request queue is full "
                               f"({len(self._pending)} waiting); retry later",
                               "rate_limit_error", None, "queue_full")
            self._pending.append(job)
            self.stats["accepted"] += 1
            self.records.append(job.record)
            self._cv.notify_all()

    def withdraw(self, job: Job, reason: str) -> None:
        """The client of ``job`` is gone: drop it from the queue, or stop its generation."""
        job.cancel(reason)
        with self._cv:
            if job in self._pending:
                self._pending.remove(job)
                self._finish(job, "skipped")
                log.info("%s skipped: %s while queued", job.id, reason)

    def _finish(self, job: Job, outcome: str, result: GenerationResult | None = None) -> None:
        with self._cv:
            record = job.record
            record.outcome = outcome
            record.finished_at = time.monotonic()
            if result is not None:
                record.completion_tokens = len(result.token_ids)
                record.finish_reason = result.finish_reason
            self.stats[outcome] += 1

    def _generation_loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                self._current = job
            try:
                self._run(job)
            finally:
                with self._cv:
                    self._current = None
                    self._cv.notify_all()

    def _run(self, job: Job) -> None:
        record = job.record
        record.started_at = time.monotonic()
        record.outcome = "running"
        record.completion_tokens = 0
        try:
            if job.cancelled.is_set():
                raise GenerationCancelled(job.cancel_reason)
            result = self.master.engine.generate(job.prompt_ids, job.sampling, job.gen,
                                                 job.on_text)
        except GenerationCancelled as exc:
            shutdown = self._stopping
            self._finish(job, "shutdown" if shutdown else "cancelled")
            log.info("%s cancelled after %d of at most %d tokens: %s", job.id,
                     record.completion_tokens, record.max_tokens, exc)
            job.events.put(("error", _shutting_down() if shutdown else
                            APIError(499, "the request was cancelled", "server_error")))
        except ClusterError as exc:
            self._finish(job, "failed")
            log.error("%s failed: %s", job.id, exc)
            job.events.put(("error", APIError(503, f"the cluster failed: {exc}",
                                              "server_error", None, "cluster_error")))
        except ValueError as exc:  # e.g. a prompt that leaves no room in the context
            self._finish(job, "failed")
            job.events.put(("error", bad_request(str(exc))))
        except Exception as exc:  # noqa: BLE001 - the request must get an answer
            self._finish(job, "failed")
            log.exception("%s failed", job.id)
            job.events.put(("error", APIError(500, f"generation failed: {exc}",
                                              "server_error", None, "generation_failed")))
        else:
            self._finish(job, "completed", result)
            log.info("%s: %d prompt tokens, %d generated (%s), %.0f ms", job.id,
                     result.prompt_tokens, len(result.token_ids), result.finish_reason,
                     (time.monotonic() - record.started_at) * 1000)
            job.events.put(("done", result))

    # -- request building -------------------------------------------------------------------

    def build_job(self, kind: str, body: dict[str, Any]) -> Job:
        sampling, gen, stream, include_usage = parse_common(body, self.settings)
        tokenizer = self.master.tokenizer
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
        else:
            _unsupported(body, "logprobs")
            _unsupported(body, "echo", (None, False))
            _unsupported(body, "suffix", (None, ""))
            ids = parse_prompt(body, tokenizer)
        if not ids:
            raise bad_request("the prompt is empty", "messages" if kind == "chat" else "prompt")
        context = self.master.max_seq_len
        if len(ids) >= context:
            raise bad_request(f"the prompt has {len(ids)} tokens; this model's context is "
                              f"{context} tokens", "messages" if kind == "chat" else "prompt",
                              "context_length_exceeded")
        return Job(kind, list(ids), sampling, gen, stream, include_usage)


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", "server_error", None, "shutting_down")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- response bodies --------------------------------------------------------------------------


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
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n".encode()


# -- HTTP -------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    app: APIServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake the threads of idle keep-alive connections so they exit."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _ClientGone(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "edgetp"
    sys_version = ""
    timeout = 300  # seconds a connection may stall (idle keep-alive, a client not reading)
    _chunked = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    # -- dispatch ---------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        app = self.server.app
        with app._cv:
            app._active += 1
        try:
            self._dispatch(method, app)
        except _ClientGone:
            self.close_connection = True
        except APIError as err:
            self._send_error(err)
        except OSError as exc:  # a broken connection
            log.debug("connection from %s: %s", self.address_string(), exc)
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - a bug must not leave the client hanging
            log.exception("internal error")
            self.close_connection = True
            self._send_error(APIError(500, f"internal error: {exc}", "server_error"))
        finally:
            with app._cv:
                app._active -= 1
                app._cv.notify_all()

    def _dispatch(self, method: str, app: APIServer) -> None:
        path = unquote(urlsplit(self.path).path).rstrip("/") or "/"
        body = self._read_body() if method in ("POST", "PUT") else b""
        if path == "/health":  # without the key: only the status, for liveness probes
            self._only(method, "GET")
            report = app.health()
            try:
                self._check_auth(app.settings.api_key)
            except APIError:
                report = {"status": report["status"]}
            self._send_json(200 if report["status"] == "ok" else 503, report)
            return
        self._check_auth(app.settings.api_key)
        if path == "/v1/models":
            self._only(method, "GET")
            self._send_json(200, {"object": "list", "data": [_model_card(app)]})
        elif path.startswith("/v1/models/"):
            self._only(method, "GET")
            name = path[len("/v1/models/"):]
            if name != app.settings.model_name:
                raise APIError(404, f"The model `{name}` does not exist", param="model",
                               code="model_not_found")
            self._send_json(200, _model_card(app))
        elif path in ("/v1/completions", "/v1/chat/completions"):
            self._only(method, "POST")
            kind = "chat" if path == "/v1/chat/completions" else "completion"
            try:
                job = app.build_job(kind, _parse_json(body))
            except ConfigError as exc:
                raise bad_request(str(exc)) from exc
            app.submit(job)
            self._respond(app, job)
        else:
            raise APIError(404, f"Unknown request URL: {method} {path}", code="unknown_url")

    def _only(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise APIError(405, f"{method} is not allowed here; use {allowed}",
                           code="method_not_allowed")

    def _check_auth(self, key: str | None) -> None:
        if key is None:
            return
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "You didn't provide an API key: send `Authorization: Bearer "
                           "KEY`", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise APIError(411, "send the body with a Content-Length", code="length_required")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise bad_request("invalid Content-Length") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes",
                           code="request_too_large")
        return self.rfile.read(length)

    # -- answering a generation -------------------------------------------------------------

    def _respond(self, app: APIServer, job: Job) -> None:
        model = app.settings.model_name
        try:
            if job.stream:
                self._stream(job, model)
            else:
                kind, value = self._next_event(job)
                if kind == "error":
                    raise value
                self._send_json(200, completion_body(job, model, value))
        except _ClientGone:
            app.withdraw(job, "the client disconnected")
            raise

    def _next_event(self, job: Job) -> tuple[str, Any]:
        """The job's next event; raises _ClientGone if the client disconnects meanwhile."""
        while True:
            try:
                return job.events.get(timeout=POLL_S)
            except queue.Empty:
                if self._client_gone():
                    raise _ClientGone() from None

    def _events(self, job: Job) -> Iterator[tuple[str, Any]]:
        while True:
            kind, value = self._next_event(job)
            yield kind, value
            if kind != "text":
                return

    def _stream(self, job: Job, model: str) -> None:
        events = self._events(job)
        kind, value = next(events)
        if kind == "error":  # nothing sent yet: a proper status code
            raise value
        self._chunked = self.request_version != "HTTP/1.0"  # 1.0 clients read to the close
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if job.kind == "chat":  # OpenAI's first chunk names the role
            self._write_chunk(sse(chunk_body(job, model, "", first=True)))
        while True:
            if kind == "text":
                self._write_chunk(sse(chunk_body(job, model, value)))
            elif kind == "done":
                reason = FINISH_REASONS[value.finish_reason]
                self._write_chunk(sse(chunk_body(job, model, None, reason)))
                if job.include_usage:
                    closing = chunk_body(job, model, None)
                    closing.update(choices=[], usage=usage(value))
                    self._write_chunk(sse(closing))
                break
            else:  # an error after the stream began: an error event, as OpenAI sends them
                self._write_chunk(sse(value.body()))
                break
            kind, value = next(events)
            if self._client_gone():
                raise _ClientGone()
        self._write_chunk(sse("[DONE]"))
        if self._chunked:
            self._write_raw(b"0\r\n\r\n")

    def _write_chunk(self, data: bytes) -> None:
        self._write_raw(b"%X\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    def _write_raw(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError as exc:
            raise _ClientGone() from exc

    def _client_gone(self) -> bool:
        """True if the client closed its end (end-of-file or an error on the socket)."""
        try:
            if hasattr(select, "poll"):  # select() cannot watch descriptors >= 1024
                poller = select.poll()
                poller.register(self.connection, select.POLLIN)
                readable = bool(poller.poll(0))
            else:
                readable = bool(select.select([self.connection], [], [], 0)[0])
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- plain responses --------------------------------------------------------------------

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError as exc:
            raise _ClientGone() from exc

    def _send_error(self, err: APIError) -> None:
        if err.status >= 500:
            log.warning("answering %d: %s", err.status, err.message)
        extra = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
        data = json.dumps(err.body()).encode()
        try:
            self.send_response(err.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in extra.items():
                self.send_header(name, value)
            if err.status == 429:
                self.send_header("Retry-After", "1")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    return data


def _model_card(app: APIServer) -> dict[str, Any]:
    return {"id": app.settings.model_name, "object": "model", "created": app.started,
            "owned_by": "edgetp"}


# -- the command ------------------------------------------------------------------------------


def run_server(master: Any, settings: ServerSettings, host: str = "127.0.0.1",
               port: int = 8000, on_ready: Callable[[APIServer], None] | None = None) -> None:
    """Serve ``master`` until Ctrl-C or SIGTERM (``edgetp serve``)."""
    server = APIServer(master, settings, host, port).start()
    if on_ready is not None:
        on_ready(server)
    server.wait()
