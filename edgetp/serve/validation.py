"""Request bodies checked against :mod:`edgetp.serve.protocol`, failures worded as 400 answers.

:func:`validate_request` returns the request model or raises an
:class:`~edgetp.serve.errors.APIError` in OpenAI's shape about the first field that is wrong:
``param`` is OpenAI's path of the field (``messages.[0].role``), the message says what is wrong
with it and what it may be (``temperature must be in [0, 2], got 5``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from edgetp.serve.errors import APIError, bad_request
from edgetp.serve.protocol import shown

RequestModel = TypeVar("RequestModel", bound=BaseModel)

# pydantic's error types -> what the field must be (the input follows as ", got ...")
EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "finite_number": "a number",
    "bool_type": "a boolean",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
}
RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
SHOWN_CHARS = 100  # of a wrong value, in an error message


def validate_request(model: type[RequestModel], body: dict[str, Any]) -> RequestModel:
    """``body`` as a ``model``, or the 400 APIError about its first wrong field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise request_error(model, exc.errors()[0]) from None


def request_error(model: type[BaseModel], error: ErrorDetails) -> APIError:
    """The APIError answering one of pydantic's errors about a request of ``model``."""
    loc = error["loc"]
    path = field_path(loc)
    code = "unsupported_parameter" if error["type"] == "unsupported_parameter" else None
    return bad_request(describe(model, error, path), openai_param(loc), code)


def describe(model: type[BaseModel], error: ErrorDetails, path: str) -> str:
    """What is wrong with the field at ``path``, and what it may be."""
    kind, value = error["type"], _Shown(error.get("input"))
    if kind == "missing":
        return f"you must provide a `{path}` parameter" if len(error["loc"]) == 1 \
            else f"{path} is required"
    if kind in ("invalid_value", "unsupported_parameter"):  # protocol's own phrases
        return f"{path} {error['msg']}"
    if kind in EXPECTED:
        return f"{path} must be {EXPECTED[kind]}, got {value!r}"
    if kind in RANGE_ERRORS:
        return f"{path} must be {allowed_range(model, error)}, got {value!r}"
    if kind == "literal_error":
        return f"{path} must be one of {error.get('ctx', {}).get('expected')}, got {value!r}"
    if kind == "too_short":
        least = error.get("ctx", {}).get("min_length", 1)
        return f"{path} must be a non-empty list" if least == 1 \
            else f"{path} must have at least {least} items"
    return f"{path}: {error['msg'][:1].lower()}{error['msg'][1:]}"


class _Shown:
    """A value as an error message quotes it (:func:`~edgetp.serve.protocol.shown`)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return shown(self.value, SHOWN_CHARS)


Bound = tuple[float, bool]  # a limit and whether it is allowed itself


def allowed_range(model: type[BaseModel], error: ErrorDetails) -> str:
    """The range a number must be in: the field's declared bounds (``in [0, 2]``, ``in (0,
    1]``, ``>= 1``), or the one it broke if it is not a top-level field of ``model``."""
    loc = error["loc"]
    field = model.model_fields.get(str(loc[0])) if len(loc) == 1 else None
    declared = [] if field is None else field.metadata
    low = next((_bound(b) for b in declared if isinstance(b, Ge | Gt)), None)
    high = next((_bound(b) for b in declared if isinstance(b, Le | Lt)), None)
    if low is None and high is None:
        low, high = _broken_bound(error)
    if low is not None and high is not None:
        return (f"in {'[' if low[1] else '('}{low[0]:g}, "
                f"{high[0]:g}{']' if high[1] else ')'}")
    if low is not None:
        return f"{'>=' if low[1] else '>'} {low[0]:g}"
    assert high is not None
    return f"{'<=' if high[1] else '<'} {high[0]:g}"


def _bound(bound: Ge | Gt | Le | Lt) -> Bound:
    if isinstance(bound, Ge):
        return _limit(bound.ge), True
    if isinstance(bound, Gt):
        return _limit(bound.gt), False
    if isinstance(bound, Le):
        return _limit(bound.le), True
    return _limit(bound.lt), False


def _limit(value: object) -> float:
    assert isinstance(value, int | float), value  # the protocol's bounds are numbers
    return float(value)


def _broken_bound(error: ErrorDetails) -> tuple[Bound | None, Bound | None]:
    """(low, high) from the bound named in ``error``'s context."""
    ctx = error.get("ctx", {})
    for key, low, inclusive in (("ge", True, True), ("gt", True, False),
                                ("le", False, True), ("lt", False, False)):
        if key in ctx:
            bound = (_limit(ctx[key]), inclusive)
            return (bound, None) if low else (None, bound)
    return None, None


def field_path(loc: Sequence[int | str]) -> str:
    """``messages[0].content`` for pydantic's ``("messages", 0, "content")``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def openai_param(loc: Sequence[int | str]) -> str:
    """OpenAI's ``param`` for a field: ``messages.[0].content``."""
    return ".".join(f"[{part}]" if isinstance(part, int) else str(part) for part in loc)
