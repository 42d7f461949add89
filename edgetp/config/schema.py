"""The pydantic side of edgetp's input files: strict sections, value types, edgetp's wording.

Every file a user writes (the cluster file, link profiles) is described by :class:`Section`
models: strict types (``1.5`` is not an integer, ``"yes"`` is not a boolean), unknown keys
refused with a "did you mean", required keys named with what they are for. :func:`validate`
runs a model and turns pydantic's first error into one :class:`~edgetp.core.errors.ConfigError`
that names the file and the place, as ``SOURCE: nodes[1] (pi).threads must be >= 1, got 0``.

Errors come in three shapes, by their pydantic type:

* a *phrase* about one value (pydantic's own types, or :func:`phrase`) follows the dotted
  place of the value: ``master.port 70000 is not a TCP port (1-65535)``;
* a *sentence* about a section (:func:`sentence`, from a section's validator) follows the
  section's place and a colon: ``nodes[1] (pi): 'address' is required``;
* a sentence about one value (:func:`value_sentence`) follows the section, a colon, the key
  and a colon: ``nodes[1] (pi): memory_budget: cannot read '1.5 gigs' as a size``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from edgetp.core.errors import ConfigError
from edgetp.core.units import parse_bytes

M = TypeVar("M", bound=BaseModel)

PHRASES = {
    "int_type": "must be an integer, got {input!r}",
    "float_type": "must be a number, got {input!r}",
    "bool_type": "must be true or false, got {input!r}",
    "string_type": "must be a string, got {input!r}",
    "list_type": "must be a list, got {input!r}",
    "dict_type": "must be a mapping, got {input!r}",
    "greater_than": "must be a number > {gt}, got {input!r}",
    "greater_than_equal": "must be >= {ge}, got {input!r}",
    "less_than_equal": "must be <= {le}, got {input!r}",
}


def phrase(text: str) -> PydanticCustomError:
    """An error about one value, written after its place: ``must be ...``, ``'x' is ...``."""
    return PydanticCustomError("edgetp_phrase", "{text}", {"text": text})


def sentence(text: str) -> PydanticCustomError:
    """An error about a section, after its place and a colon: ``'address' is required``."""
    return PydanticCustomError("edgetp_sentence", "{text}", {"text": text})


def value_sentence(text: str) -> PydanticCustomError:
    """An error about one value, after ``SECTION: KEY:``: ``cannot read 'x' as a size``."""
    return PydanticCustomError("edgetp_value", "{text}", {"text": text})


class Section(BaseModel):
    """A mapping in a file: strict, every key known, missing keys named with their purpose."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    what: ClassVar[str] = "a section"  # "a node", "master": names the mapping in errors
    hints: ClassVar[dict[str, str]] = {}  # why a required key is needed, after its name

    @model_validator(mode="before")
    @classmethod
    def _keys_known(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            raise sentence(f"{cls.what} must be a mapping, got {type(data).__name__}")
        known = cls.keys()
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise sentence(f"unknown key {key!r}{hint}; {cls.what} has {', '.join(known)}")
        for name, field in cls.model_fields.items():
            key = field.alias or name
            if field.is_required() and key not in data:
                raise sentence(f"{key!r} is required{cls.hints.get(key, '')}")
        cls.check_keys(data, info)
        return data

    @classmethod
    def check_keys(cls, data: dict[str, Any], info: ValidationInfo) -> None:
        """Further checks of the keys given, before their values (none by default)."""

    @classmethod
    def keys(cls) -> list[str]:
        """The keys this mapping may have, as a file spells them."""
        return [field.alias or name for name, field in cls.model_fields.items()]


def validate(model: type[M], data: Any, source: str, context: Any = None,
             keyed: Sequence[str] = ()) -> M:
    """``model`` validated from ``data``; pydantic's first error as a ConfigError.

    ``keyed`` names the fields that map names to sections (``link_profiles``): their keys are
    written ``link_profiles: NAME`` in messages.
    """
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(describe(exc.errors()[0], data, source, keyed)) from None


def describe(error: Any, data: Any, source: str, keyed: Sequence[str] = ()) -> str:
    """One pydantic error in edgetp's words, starting with ``source``."""
    loc = [part for part in error["loc"] if not (isinstance(part, str) and part[:1] == "<")]
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "edgetp_value" and loc:
        place = _place(loc[:-1], data, keyed)
        return f"{source}: {place + ': ' if place else ''}{loc[-1]}: {ctx['text']}"
    if kind in ("edgetp_sentence", "edgetp_value", "value_error"):
        place = _place(loc, data, keyed)
        text = ctx.get("text") or str(ctx.get("error"))
        return f"{source}: {place}: {text}" if place else f"{source}: {text}"
    if kind == "edgetp_phrase":
        text = ctx["text"]
    elif kind in PHRASES:
        text = PHRASES[kind].format(input=error["input"], **{k: _number(v) for k, v in ctx.items()})
    else:
        text = f"is wrong: {error['msg']}"
    place = _place(loc, data, keyed)
    return f"{source}: {place} {text}" if place else f"{source} {text}"


def _place(loc: list[Any], data: Any, keyed: Sequence[str]) -> str:
    """``nodes[1] (pi).link``, ``link_profiles: lan.latency_ms``: a pydantic location in words.

    A list item that is a mapping with a ``name`` is followed by it; the keys of a ``keyed``
    field follow it after a colon.
    """
    text, raw, after_keyed = "", data, False
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif after_keyed:
            text += f": {part}"
        else:
            text += f".{part}" if text else str(part)
        after_keyed = isinstance(part, str) and part in keyed
        raw = _child(raw, part)
        name = raw.get("name") if isinstance(part, int) and isinstance(raw, dict) else None
        if isinstance(name, str):
            text += f" ({name})"
    return text


def _child(raw: Any, part: Any) -> Any:
    if isinstance(raw, dict):
        return raw.get(part)
    if isinstance(raw, list) and isinstance(part, int) and 0 <= part < len(raw):
        return raw[part]
    return None


def _number(value: Any) -> Any:
    return f"{value:g}" if isinstance(value, float) else value


# -- value types -------------------------------------------------------------------------------

def _text(value: Any) -> str:
    """A non-empty string; numbers are taken as their text (``threads: 4`` -> ``"4"``)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float) or str(value) == "":
        raise phrase(f"must be a non-empty string, got {value!r}")
    return str(value)


def _size(value: Any) -> Any:
    """A size in bytes from ``1.5GiB``, ``800MB`` or a plain number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise value_sentence(f"must be a size such as 1.5GiB, got {value!r}")
    try:
        return parse_bytes(value)
    except ConfigError as exc:
        raise value_sentence(str(exc)) from None


def choice(options: Sequence[str]) -> BeforeValidator:
    """A validator that accepts one of ``options``."""

    def check(value: Any) -> Any:
        if value not in options:
            raise phrase(f"must be one of {', '.join(options)}, got {value!r}")
        return value

    return BeforeValidator(check)


def matching(test: Callable[[str], bool], expected: str) -> BeforeValidator:
    """A validator for text that must pass ``test``; ``expected`` says what it should be."""

    def check(value: Any) -> Any:
        text = _text(value)
        if not test(text):
            raise phrase(f"{text!r} {expected}")
        return text

    return BeforeValidator(check)


Text = Annotated[str, BeforeValidator(_text)]
Size = Annotated[int | None, BeforeValidator(_size)]
Count = Annotated[StrictInt, Field(ge=1)]
NonNegative = Annotated[StrictFloat, Field(ge=0)]
Positive = Annotated[StrictFloat, Field(gt=0)]
