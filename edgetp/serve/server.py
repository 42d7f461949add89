"""An OpenAI-compatible HTTP API on the master (``edgetp serve``): :class:`APIServer`.

The server runs on the master only: request bodies (prompts, messages, sampling settings) and
the generated text never leave this process; the workers keep receiving hidden states only.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both with ``stream: true`` as server-sent events in OpenAI's
format) and ``GET /health``. Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.

A cluster computes one sequence at a time, so requests wait in a bounded FIFO queue that one
generation thread drains (:mod:`edgetp.serve.generation`). The HTTP threads
(:mod:`edgetp.serve.http_handler`) only parse, tokenize, queue and write; the generation
thread never touches a socket. A request that does not fit in the queue gets 429; every
accepted request ends in a response or an error. A client that goes away is noticed (a failed
write, or end-of-file on its socket) and its generation is stopped between two steps, or, if
it is still queued, it is dropped from the queue.

``edgetp serve`` takes its port before it loads the model (:func:`listen_on`): a port that is
taken, or an address that is not this machine's, is said at once in one line.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import signal
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from edgetp.core.errors import ConfigError
from edgetp.serve.errors import APIError, bad_request
from edgetp.serve.generation import GenerationQueue
from edgetp.serve.http_handler import HTTPServer, http_server
from edgetp.serve.intake import build_job
from edgetp.serve.jobs import Job, JobKind, RequestRecord
from edgetp.serve.protocol import ModelCard
from edgetp.serve.settings import ServerSettings, default_model_name

if TYPE_CHECKING:
    from edgetp.runtime.master import Master

__all__ = ["APIServer", "RequestRecord", "ServerSettings", "default_model_name", "listen_on",
           "run_server"]

log = logging.getLogger("edgetp.serve.server")

SHUTDOWN_GRACE_S = 3.0  # after Ctrl-C or SIGTERM: how long running requests may take to end
PREPARE_WAIT_S = 30.0  # how long a request waits for its turn to be tokenized


class APIServer:
    """The HTTP server, the request queue and the generation thread around one master.

    ``master`` is an :class:`edgetp.runtime.master.Master` (local or cluster); the server is
    its only user while it runs. ``start()`` binds (``port=0`` picks a free port), or takes
    ``listener`` (from :func:`listen_on`), and returns at once; ``stop()`` answers every queued
    request, stops the running generation and closes all connections.
    """

    def __init__(self, master: Master, settings: ServerSettings, host: str = "127.0.0.1",
                 port: int = 8000, listener: socket.socket | None = None) -> None:
        self.master = master
        self.settings = settings
        self.host = host
        self.port = port
        self._listener = listener
        self.started = int(time.time())
        self.queue = GenerationQueue(master, settings.queue_size)
        self._httpd: HTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._handling = threading.Condition()
        self._active = 0  # HTTP requests being handled
        self._preparing = threading.BoundedSemaphore(settings.prompt_workers)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> APIServer:
        try:
            self._httpd = http_server(self.host, self.port, self, self._listener)
        except OSError as exc:
            raise port_error(self.host, self.port, exc) from exc
        self.port = int(self._httpd.server_address[1])
        self.queue.start()
        self._http_thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
            name="edgetp-http", daemon=True)
        self._http_thread.start()
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
        """Stop; requests still running after ``timeout_s`` (in all) are cut off."""
        httpd = self._httpd
        if httpd is None:
            return
        httpd.shutdown()  # no new connections
        self.queue.stop()
        deadline = time.monotonic() + timeout_s
        with self._handling:
            while self._active and time.monotonic() < deadline:
                self._handling.wait(0.05)
        httpd.close_connections()
        httpd.server_close()
        self.queue.join(max(0.0, deadline - time.monotonic()))
        if self._http_thread is not None:
            self._http_thread.join(max(0.0, deadline - time.monotonic()))
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
            self.stop(SHUTDOWN_GRACE_S)

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
            "queue": {"length": queued, "capacity": self.settings.queue_size},
            "busy": busy,
            "requests": requests,
        }

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.settings.model_name, created=self.started)

    # -- requests (called by the HTTP threads) ----------------------------------------------

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """Count an HTTP request as in progress (``stop`` waits for them to end)."""
        with self._handling:
            self._active += 1
        try:
            yield
        finally:
            with self._handling:
                self._active -= 1
                self._handling.notify_all()

    def accept(self, kind: JobKind, body: dict[str, Any]) -> Job:
        """Check and queue a completion request; raises the APIError to answer instead.

        At most ``settings.prompt_workers`` requests are checked, rendered and tokenized at
        once (that work runs outside the GIL, but on the cores the cluster computes with); a
        request that waits more than :data:`PREPARE_WAIT_S` for its turn gets 503.
        """
        if not self._preparing.acquire(timeout=PREPARE_WAIT_S):
            raise APIError(503, "the server is busy preparing other prompts; retry later",
                           "server_error", None, "server_busy")
        try:
            job = build_job(kind, body, self.settings, self.master)
        except ConfigError as exc:
            raise bad_request(str(exc)) from exc
        finally:
            self._preparing.release()
        self.queue.submit(job)
        return job

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
