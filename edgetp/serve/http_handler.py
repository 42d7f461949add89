"""The HTTP layer (standard library ``http.server``): routes, API keys, bodies, answers.

One thread per connection (HTTP/1.1 keep-alive), at most ``max_connections`` of them: a
connection beyond is answered 503 at once and closed. A handler thread reads and checks a request,
asks the :class:`~edgetp.serve.server.APIServer` for the answer (a job for the completion
endpoints) and writes it: a JSON body, or the job's server-sent events as they come. It polls
its socket while it waits, so a client that goes away is noticed and its job withdrawn.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import queue
import select
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from edgetp.serve.errors import APIError, bad_request, model_not_found
from edgetp.serve.jobs import Failed, Finished, Job, JobEvent, JobKind, TextPiece
from edgetp.serve.protocol import ModelList
from edgetp.serve.responses import completion_body, stream_events

if TYPE_CHECKING:
    from edgetp.serve.server import APIServer

log = logging.getLogger("edgetp.serve.http_handler")

MAX_BODY_BYTES = 8 << 20
POLL_S = 0.05  # how often a waiting request checks whether its client is still there
COMPLETION_PATHS: dict[str, JobKind] = {"/v1/completions": "completion",
                                        "/v1/chat/completions": "chat"}


class HTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that can wake its idle keep-alive connections to close them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: APIServer,
                 listener: socket.socket | None = None) -> None:
        self.app = app
        self._listener = listener  # a socket bound (and listening) before: used instead
        self.max_connections = app.settings.max_connections
        self.refused = 0  # connections answered 503 for passing max_connections
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        if self._listener is None:
            super().server_bind()
            return
        self.socket.close()
        self.socket = self._listener
        self.server_address = self.socket.getsockname()
        self.server_name = socket.getfqdn(str(self.server_address[0]))
        self.server_port = int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            full = len(self._connections) >= self.max_connections
            if not full:
                self._connections.add(request)
        if full:
            self._refuse(request)
            return
        super().process_request(request, client_address)

    def _refuse(self, request: socket.socket) -> None:
        """Answer a connection over the limit with 503 (without waiting on it), and close it."""
        self.refused += 1
        error = APIError(503, f"the server has {self.max_connections} connections open, its "
                         "limit; retry later", "server_error", None, "too_many_connections")
        body = json.dumps(error.body()).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        try:
            request.setblocking(False)
            request.send(head.encode() + body)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        request.close()

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


class HTTPServer6(HTTPServer):
    address_family = socket.AF_INET6


def http_server(host: str, port: int, app: APIServer,
                listener: socket.socket | None = None) -> HTTPServer:
    """Bind ``host:port`` (IPv6 if ``host`` has a colon) for ``app``, or take ``listener``,
    a socket bound to it already."""
    server_class = HTTPServer6 if ":" in host else HTTPServer
    return server_class((host, port), app, listener)


class ClientGone(Exception):
    """The client closed its connection (noticed on a write, or by polling its socket)."""


class Handler(BaseHTTPRequestHandler):
    server: HTTPServer
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
        with app.handling():
            try:
                self._dispatch(method, app)
            except ClientGone:
                self.close_connection = True
            except APIError as err:
                self._send_error(err)
            except RecursionError:  # a body nested deeper than Python recurses
                self.close_connection = True
                self._send_error(bad_request("the request body is nested too deeply"))
            except OSError as exc:  # a broken connection
                log.debug("connection from %s: %s", self.address_string(), exc)
                self.close_connection = True
            except Exception as exc:  # noqa: BLE001 - a bug must not leave the client hanging
                log.exception("internal error")
                self.close_connection = True
                self._send_error(APIError(500, f"internal error: {exc}", "server_error"))

    def _dispatch(self, method: str, app: APIServer) -> None:
        path = unquote(urlsplit(self.path).path).rstrip("/") or "/"
        body = self._read_body() if method in ("POST", "PUT") else b""
        if path == "/health":  # without the key: only the status, for liveness probes
            self._only(method, "GET")
            self._send_health(app)
            return
        self._check_auth(app.settings.api_key)
        if path == "/v1/models":
            self._only(method, "GET")
            self._send_json(200, ModelList(data=[app.model_card()]).model_dump())
        elif path.startswith("/v1/models/"):
            self._only(method, "GET")
            name = path[len("/v1/models/"):]
            if name != app.settings.model_name:
                raise model_not_found(name)
            self._send_json(200, app.model_card().model_dump())
        elif path in COMPLETION_PATHS:
            self._only(method, "POST")
            job = app.accept(COMPLETION_PATHS[path], _parse_json(body))
            self._respond(app, job)
        else:
            raise APIError(404, f"Unknown request URL: {method} {path}", code="unknown_url")

    def _send_health(self, app: APIServer) -> None:
        report = app.health()
        try:
            self._check_auth(app.settings.api_key)
        except APIError:
            report = {"status": report["status"]}
        self._send_json(200 if report["status"] == "ok" else 503, report)

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
                event = self._next_event(job)
                if isinstance(event, Failed):
                    raise event.error
                assert isinstance(event, Finished)  # only a stream has text pieces
                self._send_json(200, completion_body(job, model, event.result))
        except ClientGone:
            app.withdraw(job, "the client disconnected")
            raise

    def _next_event(self, job: Job) -> JobEvent:
        """The job's next event; raises ClientGone if the client disconnects meanwhile."""
        while True:
            try:
                return job.events.get(timeout=POLL_S)
            except queue.Empty:
                if self._client_gone():
                    raise ClientGone() from None

    def _later_events(self, job: Job) -> Iterator[JobEvent]:
        """The job's events after the first, until the last; stops when the client is gone."""
        while True:
            event = self._next_event(job)
            if self._client_gone():
                raise ClientGone()
            yield event
            if not isinstance(event, TextPiece):
                return

    def _stream(self, job: Job, model: str) -> None:
        first = self._next_event(job)
        if isinstance(first, Failed):  # nothing sent yet: a proper status code
            raise first.error
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
        events = itertools.chain([first], self._later_events(job))
        for data in stream_events(job, model, events):
            self._write_chunk(data)
        if self._chunked:
            self._write_raw(b"0\r\n\r\n")

    def _write_chunk(self, data: bytes) -> None:
        self._write_raw(b"%X\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    def _write_raw(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError as exc:
            raise ClientGone() from exc

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
            raise ClientGone() from exc

    def _send_error(self, err: APIError) -> None:
        if err.status >= 500:
            log.warning("answering %d: %s", err.status, err.message)
        data = json.dumps(err.body()).encode()
        try:
            self.send_response(err.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if err.status == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            if err.status == 429 or err.code == "server_busy":
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
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    return data
