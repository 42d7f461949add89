"""The HTTP layer: the API as a FastAPI application (routes, the API key, bodies, answers).

:func:`create_app` builds the ASGI application of an :class:`~edgetp.serve.server.APIServer`,
which runs it on uvicorn. Its coroutines only read, check, queue and write: a completion
request's body is read here, checked, rendered and tokenized on a worker thread (at most
``prompt_workers`` at once, :meth:`APIServer.accept`), and its job's events are awaited and
written as a JSON answer or as server-sent events. A client that goes away is noticed while
its request waits (uvicorn reports the disconnect) and its job is withdrawn.

Errors of every kind (the API's own, unknown paths, wrong methods, missing keys, bugs) are
answered in OpenAI's shape; :mod:`edgetp.serve.schema` writes ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgetp.serve.errors import APIError, bad_request, model_not_found
from edgetp.serve.jobs import Failed, Finished, Job, JobEvent, JobKind, TextPiece
from edgetp.serve.protocol import ModelCard, ModelList
from edgetp.serve.responses import completion_body, stream_event, stream_head
from edgetp.serve.schema import COMPLETION_ROUTES, install_schema, route_docs

if TYPE_CHECKING:
    from edgetp.serve.server import APIServer

log = logging.getLogger("edgetp.serve.app")

MAX_BODY_BYTES = 8 << 20
OPEN_PATHS = ("/health", "/openapi.json")  # answered without the key (/health: its status)
CLIENT_GONE = 499  # the status a request whose client went away is logged and counted with


class ClientGone(Exception):
    """The client closed its connection while its request waited."""


def create_app(server: APIServer) -> FastAPI:
    """The ASGI application of ``server``."""
    app = FastAPI(title="edgetp", summary="OpenAI-compatible API of an edgetp cluster",
                  version="1", docs_url=None, redoc_url=None)
    app.add_exception_handler(APIError, _answer_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _answer_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RecursionError, _answer_too_deep)
    app.add_exception_handler(Exception, _answer_bug)
    _add_routes(app, server)
    app.add_middleware(KeyCheck, key=server.settings.api_key)
    app.add_middleware(ResponseCounter, count=server.metrics.count_response)
    install_schema(app, server.settings.model_name, server.settings.api_key is not None)
    return app


def _add_routes(app: FastAPI, server: APIServer) -> None:
    @app.get("/health", **route_docs("health"))
    async def health(request: Request) -> JSONResponse:
        report = await asyncio.to_thread(server.health)
        if key_error(request.headers.get("authorization", ""), server.settings.api_key):
            report = {"status": report["status"]}  # a probe without the key: only the status
        return JSONResponse(report, 200 if report["status"] == "ok" else 503)

    @app.get("/metrics", **route_docs("metrics"))
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", **route_docs("models"))
    async def models() -> ModelList:
        return ModelList(data=[server.model_card()])

    @app.get("/v1/models/{model_id:path}", **route_docs("model"))
    async def model(model_id: str) -> ModelCard:
        if model_id != server.settings.model_name:
            raise model_not_found(model_id)
        return server.model_card()

    for path, kind in COMPLETION_ROUTES.items():
        app.add_api_route(path, _completion_route(server, kind), methods=["POST"],
                          **route_docs(kind))


def _completion_route(server: APIServer, kind: JobKind) -> Callable[[Request], Any]:
    async def complete(request: Request) -> Response:
        body = await read_body(request)
        job = await server.accept(kind, body, asyncio.get_running_loop())
        try:
            first = await first_event(request, job)
        except ClientGone:
            server.withdraw(job, "the client disconnected")
            return Response(status_code=CLIENT_GONE)
        if isinstance(first, Failed):  # nothing sent yet: a proper status code
            raise first.error
        model = server.settings.model_name
        if not job.stream:
            assert isinstance(first, Finished)  # only a stream has text pieces
            return JSONResponse(completion_body(job, model, first.result))
        return JobStream(server, job, first)

    complete.__name__ = f"create_{kind}"
    return complete


async def read_body(request: Request) -> bytes:
    """The request's body, at most :data:`MAX_BODY_BYTES` (413 beyond, before reading it when
    the client says its length)."""
    too_large = APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes",
                         code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def first_event(request: Request, job: Job) -> JobEvent:
    """The job's first event; raises ClientGone if the client disconnects meanwhile."""
    event = asyncio.ensure_future(job.next_event())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server stops
        event.cancel()
        raise
    finally:
        gone.cancel()
    if event in done:
        return event.result()
    event.cancel()
    raise ClientGone()


async def _disconnected(request: Request) -> None:
    """Return when the client has gone (the body has been read: nothing else can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class JobStream(StreamingResponse):
    """A job's answer as server-sent events, from its first event on; a client that goes away
    before the last one has its job withdrawn (the generation stops between two steps)."""

    def __init__(self, server: APIServer, job: Job, first: JobEvent) -> None:
        self.server = server
        self.job = job
        self.ended = False
        super().__init__(self._events(first), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})

    async def _events(self, first: JobEvent) -> AsyncIterator[bytes]:
        model = self.server.settings.model_name
        for data in stream_head(self.job, model):
            yield data
        event = first
        while True:
            for data in stream_event(self.job, model, event):
                yield data
            if not isinstance(event, TextPiece):
                self.ended = True
                return
            event = await self.job.next_event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.ended:
                self.server.withdraw(self.job, "the client disconnected")


# -- the API key and the answers' statuses ---------------------------------------------------


def key_error(authorization: str, key: str | None) -> APIError | None:
    """The 401 for an ``Authorization`` header that does not carry ``key`` (None: it does, or
    no key is required)."""
    if key is None:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return APIError(401, "You didn't provide an API key: send `Authorization: Bearer KEY`",
                        code="invalid_api_key")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        return APIError(401, "Incorrect API key provided", code="invalid_api_key")
    return None


class KeyCheck:
    """ASGI middleware: every path but :data:`OPEN_PATHS` needs the API key (when there is one),
    before routing, so a wrong method or path tells nothing to a client without it."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app = app
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            error = key_error(Headers(scope=scope).get("authorization", ""), self.key)
            if error is not None:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ResponseCounter:
    """ASGI middleware: tells ``count`` the status of every answer it starts."""

    def __init__(self, app: ASGIApp, count: Callable[[int], None]) -> None:
        self.app = app
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.count(int(message["status"]))
            await send(message)

        await self.app(scope, receive, counted)


# -- errors in OpenAI's shape ----------------------------------------------------------------


def error_response(error: APIError) -> JSONResponse:
    headers = {}
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if error.status == 429 or error.code == "server_busy":
        headers["Retry-After"] = "1"
    return JSONResponse(error.body(), error.status, headers)


async def _answer_api_error(request: Request, error: APIError) -> JSONResponse:
    if error.status >= 500:
        log.warning("answering %d: %s", error.status, error.message)
    return error_response(error)


async def _answer_http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Routing's errors: an unknown path (404), a method the path does not take (405)."""
    method, path = request.method, request.url.path
    if error.status_code == 404:
        return error_response(APIError(404, f"Unknown request URL: {method} {path}",
                                       code="unknown_url"))
    if error.status_code == 405:
        allowed = (error.headers or {}).get("Allow", "")
        answer = error_response(APIError(405, f"{method} is not allowed here; use {allowed}",
                                         code="method_not_allowed"))
        answer.headers["Allow"] = allowed
        return answer
    return error_response(APIError(error.status_code, str(error.detail)))


async def _answer_too_deep(request: Request, error: Exception) -> JSONResponse:
    return error_response(bad_request("the request body is nested too deeply"))


async def _answer_bug(request: Request, error: Exception) -> JSONResponse:
    """A bug must not leave the client hanging (uvicorn logs the traceback)."""
    return error_response(APIError(500, f"internal error: {error}", "server_error"))
