"""An OpenAI-compatible HTTP API on the master (``edgetp serve``): :class:`APIServer`.

The server runs on the master only: request bodies (prompts, messages, sampling settings) and
the generated text never leave this process; the workers keep receiving hidden states only.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both with ``stream: true`` as server-sent events in OpenAI's
format), ``GET /health``, ``GET /metrics`` (Prometheus) and ``GET /openapi.json``. Errors have
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

The HTTP side is a FastAPI application (:mod:`edgetp.serve.app`) on uvicorn, whose event loop
runs in a thread of its own: uvicorn owns the connections (their limit, idle keep-alive
connections, slow readers). The engine side is the request queue and its generation thread
(:mod:`edgetp.serve.generation`); :class:`~edgetp.serve.jobs.Job` is the seam between them. A
request that does not fit in the queue gets 429; every accepted request ends in a response or
an error. A client that goes away is noticed and its generation is stopped between two steps,
or, if it is still queued, it is dropped from the queue.

``edgetp serve`` takes its port before it loads the model (:func:`listen_on`): a port that is
taken, or an address that is not this machine's, is said at once in one line.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import signal
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import uvicorn

from edgetp.core.errors import ConfigError
from edgetp.serve.app import create_app
from edgetp.serve.errors import APIError, bad_request
from edgetp.serve.generation import GenerationQueue
from edgetp.serve.intake import build_job, parse_body
from edgetp.serve.jobs import Job, JobKind, RequestRecord
from edgetp.serve.metrics import ServerMetrics
from edgetp.serve.protocol import ModelCard
from edgetp.serve.settings import ServerSettings, default_model_name

if TYPE_CHECKING:
    from edgetp.runtime.master import Master

__all__ = ["APIServer", "RequestRecord", "ServerSettings", "default_model_name", "listen_on",
           "run_server"]

log = logging.getLogger("edgetp.serve.server")

SHUTDOWN_GRACE_S = 3.0  # after Ctrl-C or SIGTERM: how long running requests may take to end
PREPARE_WAIT_S = 30.0  # how long a request waits for its turn to be tokenized
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's default)
START_TIMEOUT_S = 30.0  # uvicorn must be listening within this


class APIServer:
    """The HTTP server, the request queue and the generation thread around one master.

    ``master`` is an :class:`edgetp.runtime.master.Master` (local or cluster); the server is
    its only user while it runs. ``start()`` binds (``port=0`` picks a free port), or takes
    ``listener`` (from :func:`listen_on`), and returns once uvicorn listens; ``stop()``
    answers every queued request, stops the running generation and closes all connections.
    """

    def __init__(self, master: Master, settings: ServerSettings, host: str = "127.0.0.1",
                 port: int = 8000, listener: socket.socket | None = None) -> None:
        self.master = master
        self.settings = settings
        self.host = host
        self.port = port
        self._listener = listener
        self.started = int(time.time())
        self.metrics = ServerMetrics(master, self.open_connections)
        self.queue = GenerationQueue(master, settings.queue_size, self.metrics)
        self.metrics.queue = self.queue
        self._uvicorn: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._preparing: asyncio.Semaphore | None = None  # made on uvicorn's loop

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> APIServer:
        listener = self._listener or listen_on(self.host, self.port)
        self.port = int(listener.getsockname()[1])
        config = uvicorn.Config(
            create_app(self), lifespan="off", log_config=None, log_level="warning",
            access_log=False, timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S),
            # uvicorn counts the connection asking too: N open connections may all ask
            limit_concurrency=self.settings.max_connections + 1)
        self._uvicorn = uvicorn.Server(config)
        self.queue.start()
        self._http_thread = threading.Thread(target=self._serve, args=(listener,),
                                             name="edgetp-http", daemon=True)
        self._http_thread.start()
        self._wait_until_listening()
        if not _is_loopback(self.host) and self.settings.api_key is None:
            log.warning("serving on %s without an API key: anyone who can reach this port can "
                        "use the model (set --api-key or EDGETP_API_KEY)", self.host)
        log.info("serving %s on %s (queue of %d)", self.settings.model_name, self.url,
                 self.settings.queue_size)
        return self

    def _serve(self, listener: socket.socket) -> None:
        assert self._uvicorn is not None
        asyncio.run(self._uvicorn.serve(sockets=[listener]))

    def _wait_until_listening(self) -> None:
        assert self._uvicorn is not None and self._http_thread is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._uvicorn.started:
            if not self._http_thread.is_alive() or time.monotonic() > deadline:
                self.queue.stop()
                raise ConfigError(f"the HTTP server did not start on {self.url}",
                                  "see the log above")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def open_connections(self) -> int:
        """HTTP connections open now."""
        return 0 if self._uvicorn is None else len(self._uvicorn.server_state.connections)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop; requests still running after ``timeout_s`` (in all) are cut off."""
        server, thread = self._uvicorn, self._http_thread
        if server is None or thread is None:
            return
        deadline = time.monotonic() + timeout_s
        self.queue.stop()  # queued requests get 503, the running generation stops
        server.should_exit = True  # no new connections; running requests get the grace
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            server.force_exit = True
            thread.join(1.0)
        self.queue.join(max(0.0, deadline - time.monotonic()))
        self._uvicorn = None
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
            self.stop(SHUTDOWN_GRACE_S + 2)

    # -- state ------------------------------------------------------------------------------

    @property
    def stats(self) -> Counter[str]:
        """Requests by outcome: accepted, rejected, unavailable, completed, cancelled, ..."""
        return self.queue.stats

    @property
    def records(self) -> deque[RequestRecord]:
        """The last 1000 accepted requests."""
        return self.queue.records

    def missing_ranks(self) -> list[int]:
        return self.master.missing_ranks()

    def health(self) -> dict[str, Any]:
        """Ready (``ok``) when every node has joined and reads its weights.

        ``failing`` lists the nodes whose weights fail to read, with the reason; requests are
        still taken, since each one reads the weights again.
        """
        missing = self.missing_ranks()
        failing = self.master.failing_ranks()
        expected = self.master.n_ranks
        queued, busy, requests = self.queue.snapshot()
        return {
            "status": "unavailable" if missing or failing else "ok",
            "model": self.settings.model_name,
            "nodes": {"expected": expected, "joined": expected - len(missing),
                      "missing": missing},
            "failing": [{"rank": rank, "reason": reason} for rank, reason in failing.items()],
            "queue": {"length": queued, "capacity": self.settings.queue_size,
                      "full": queued >= self.settings.queue_size},
            "busy": busy > 0,
            "batch": {"sequences": busy, "kv_slots": self.queue.slots(),
                      "waiting_for_a_slot": queued > 0 and busy >= self.queue.slots()},
            "requests": requests,
        }

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.settings.model_name, created=self.started)

    # -- requests (called by the HTTP side, on uvicorn's event loop) ------------------------

    async def accept(self, kind: JobKind, body: bytes, loop: asyncio.AbstractEventLoop) -> Job:
        """Check and queue a completion request; raises the APIError to answer instead.

        At most ``settings.prompt_workers`` requests are parsed, checked, rendered and
        tokenized at once, on worker threads (that work runs outside the GIL, but on the cores
        the cluster computes with); a request that waits more than :data:`PREPARE_WAIT_S` for
        its turn gets 503.
        """
        if self._preparing is None:
            self._preparing = asyncio.Semaphore(self.settings.prompt_workers)
        try:
            await asyncio.wait_for(self._preparing.acquire(), PREPARE_WAIT_S)
        except asyncio.TimeoutError:
            raise APIError(503, "the server is busy preparing other prompts; retry later",
                           "server_error", None, "server_busy") from None
        try:
            job = await asyncio.to_thread(self._prepare, kind, body)
        finally:
            self._preparing.release()
        job.attach(loop)
        self.queue.submit(job)
        return job

    def _prepare(self, kind: JobKind, body: bytes) -> Job:
        try:
            return build_job(kind, parse_body(body), self.settings, self.master)
        except ConfigError as exc:
            raise bad_request(str(exc)) from exc

    def withdraw(self, job: Job, reason: str) -> None:
        """The client of ``job`` is gone: drop it from the queue, or stop its generation."""
        self.queue.withdraw(job, reason)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_on(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening (IPv6 if ``host`` has a colon), for
    :class:`APIServer`; a ConfigError that says what to do if it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise port_error(host, port, exc) from exc
    return sock


def port_error(host: str, port: int, exc: OSError) -> ConfigError:
    """Why the API cannot listen on ``host:port``, and what to do."""
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"port {port} on {host} is taken (another `edgetp serve` or another "
                           "server)", f"stop it, or pick a free port with --port N (e.g. "
                           f"--port {port + 1 if port < 65535 else 8000})")
    if exc.errno == errno.EACCES:
        return ConfigError(f"not allowed to listen on {where} (ports below 1024 need root)",
                           "pick --port 1024 or above")
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return ConfigError(f"cannot listen on {where}: {host} is not an address of this "
                           "machine", "give --host one of its addresses (127.0.0.1, 0.0.0.0)")
    return ConfigError(f"cannot listen on {where}: {exc.strerror or exc}",
                       "check --host and --port")


def run_server(master: Master, settings: ServerSettings, host: str = "127.0.0.1",
               port: int = 8000, on_ready: Callable[[APIServer], None] | None = None,
               listener: socket.socket | None = None) -> None:
    """Serve ``master`` until Ctrl-C or SIGTERM (``edgetp serve``), on ``listener`` if given."""
    server = APIServer(master, settings, host, port, listener).start()
    if on_ready is not None:
        on_ready(server)
    server.wait()
