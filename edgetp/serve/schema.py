"""The API's OpenAPI document (``GET /openapi.json``) from the protocol models.

The completion endpoints read their bodies themselves (checked by
:mod:`edgetp.serve.validation`, with OpenAI's 400s rather than FastAPI's 422s), so their
request bodies are added to the document here, from :class:`ChatCompletionRequest` and
:class:`CompletionRequest` (their ``model``: the one served, the only one accepted). The
answers are documented per route (:func:`route_docs`): the JSON models of
:mod:`edgetp.serve.protocol`, the event stream, and OpenAI's error body for the statuses each
route can answer. With an API key, every operation but ``/health`` says it needs a bearer
token.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from edgetp.serve.jobs import JobKind
from edgetp.serve.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    GenerationRequest,
    TextCompletion,
)

COMPLETION_ROUTES: dict[str, JobKind] = {"/v1/completions": "completion",
                                         "/v1/chat/completions": "chat"}
REQUEST_MODELS: dict[JobKind, type[GenerationRequest]] = {"completion": CompletionRequest,
                                                          "chat": ChatCompletionRequest}
ERRORS = {  # status -> when, for the routes that answer it
    400: "A malformed request: the message names the field (`param`)",
    401: "A wrong or missing API key",
    404: "A model id that is not the served one",
    413: "A body over 8 MiB",
    429: "The request queue is full; retry later",
    503: "A worker is missing or failed, the server is shutting down, or busy",
}
STREAM = {"text/event-stream": {"itemSchema": {  # each event (OpenAPI 3.2's keyword)
    "type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "description": "A chunk (`chat.completion.chunk` or "
        "`text_completion`) as JSON, an error `{\"error\": {...}}`, or `[DONE]` last"}}}}}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": ERRORS[status]}
            for status in statuses}


def route_docs(name: str) -> dict[str, Any]:
    """The keyword arguments that document the route ``name`` (summary, answers)."""
    if name in REQUEST_MODELS:
        answer: type[BaseModel] = ChatCompletion if name == "chat" else TextCompletion
        what = "a chat completion" if name == "chat" else "a text completion"
        return {"summary": f"Create {what}",
                "responses": {200: {"model": answer, "content": STREAM,
                                    "description": "The completion, or its event stream"},
                              **_errors(400, 401, 404, 413, 429, 503)}}
    docs: dict[str, dict[str, Any]] = {
        "health": {"summary": "Whether every node has joined and reads its weights",
                   "responses": {503: {"description": "A node is missing or failing"}}},
        "metrics": {"summary": "Prometheus metrics (text format)",
                    "responses": {200: {"content": {"text/plain": {"schema": {
                        "type": "string"}}}, "description": "The metrics"},
                                  **_errors(401)}},
        "models": {"summary": "The model served", "responses": _errors(401)},
        "model": {"summary": "The model card of the model served",
                  "responses": _errors(401, 404)},
    }
    return docs[name]


def install_schema(app: FastAPI, model_name: str, keyed: bool) -> None:
    """Make ``app.openapi()`` (and so ``/openapi.json``) return :func:`openapi_document`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(app, model_name, keyed)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def openapi_document(app: FastAPI, model_name: str, keyed: bool) -> dict[str, Any]:
    """FastAPI's document of ``app`` with the completion request bodies (whose ``model`` is
    the one served, ``model_name``) and, if ``keyed``, the API key."""
    document = get_openapi(title=app.title, version=app.version, summary=app.summary,
                           routes=app.routes)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for path, kind in COMPLETION_ROUTES.items():
        model = REQUEST_MODELS[kind]
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schema["properties"]["model"] = {"anyOf": [{"const": model_name}, {"type": "null"}],
                                         "description": "The model served (optional)"}
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        document["paths"][path]["post"]["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    if keyed:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                                "scheme": "bearer"}}
        for path, operations in document["paths"].items():
            for operation in operations.values():
                if path != "/health":
                    operation["security"] = [{"bearer": []}]
    return document
