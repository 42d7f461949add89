"""The errors the API answers with: an HTTP status and OpenAI's error body.

:class:`APIError` is raised anywhere between reading a request and writing its answer; the
HTTP layer turns it into ``{"error": {"message", "type", "param", "code"}}`` with its status.
The named constructors are the errors more than one module answers with.
"""

from __future__ import annotations

from typing import Any

from edgetp.serve.protocol import ErrorDetail, ErrorResponse


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
        """OpenAI's error body."""
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param,
                             code=self.code)
        return ErrorResponse(error=detail).model_dump()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400: the request itself is wrong; ``param`` names the field to fix."""
    return APIError(400, message, "invalid_request_error", param, code)


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", "server_error", None, "shutting_down")


def model_not_found(name: str, served: str | None = None) -> APIError:
    """A 404 for a model id this server does not serve (``served``: the one it does)."""
    message = f"The model `{name}` does not exist"
    if served is not None:
        message += f"; this server serves `{served}`"
    return APIError(404, message, "invalid_request_error", "model", "model_not_found")
