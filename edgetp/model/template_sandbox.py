"""Chat templates rendered in a sandbox, in a process of their own with bounded resources.

A chat template comes with the model (``tokenizer_config.json``, ``chat_template.jinja``): it
is code someone else wrote. Jinja's sandbox (the environment transformers uses) keeps it away
from Python, but not from asking for ``'A' * 10**10`` or looping 10^10 times. So templates run
here, in a child process that :mod:`edgetp.model.template_renderer` starts and kills, under an
address-space limit (``RLIMIT_AS``, :data:`MEMORY_BYTES` above what the process uses once
started), a CPU-time limit per render (``RLIMIT_CPU``: the kernel ends a runaway render even if
its parent is gone) and a limit on the characters a render outputs.

The protocol on standard input and output: each message is a 4-byte big-endian length and a
JSON object (ASCII, so a lone surrogate survives). The child first says ``{"ready": true}``;
then each request ``{"template", "messages", "add_generation_prompt", "variables",
"max_chars", "cpu_s"}`` gets ``{"text": ...}`` or ``{"error": ..., "kind": ...}``, where
``kind`` is ``"too_long"`` for output over ``max_chars`` and ``"failed"`` otherwise. The child
ends at the end of its input (its parent closed the pipe, or died).

Only the standard library and jinja2 are imported here, so the child starts quickly.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from datetime import datetime
from functools import lru_cache
from typing import Any, BinaryIO

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

MEMORY_BYTES = 1 << 30  # address space a render may add to the started process
HEADER = struct.Struct(">I")


class TemplateRaised(Exception):
    """The template called ``raise_exception(message)``."""


class OutputTooLong(Exception):
    """The render's output passed ``max_chars``."""


class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}`` block (marks assistant text): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(x: Any, **options: Any) -> str:
    """Jinja's ``tojson`` without HTML escaping, as transformers defines it.

    ``options`` are ``json.dumps`` keywords (``indent``, ``separators``, ``sort_keys``, ...).
    """
    return json.dumps(x, **{"ensure_ascii": False, **options})


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """``source`` compiled in the sandboxed environment transformers uses for chat templates."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render(request: dict[str, Any]) -> str:
    """The template's output for the request's messages, at most ``max_chars`` long."""
    template = compile_template(request["template"])
    limit, size, pieces = request["max_chars"], 0, []
    for piece in template.generate(messages=request["messages"], tools=None, documents=None,
                                   add_generation_prompt=request["add_generation_prompt"],
                                   **request["variables"]):
        size += len(piece)
        if size > limit:
            raise OutputTooLong(f"the chat template's output passed {limit} characters")
        pieces.append(piece)
    return "".join(pieces)


def answer(request: dict[str, Any]) -> dict[str, Any]:
    """The reply to one request: the text, or the error in the words the user reads."""
    try:
        compile_template(request["template"])
    except jinja2.TemplateError as exc:
        return _failed(f"chat template does not compile: {exc}")
    try:
        return {"text": render(request)}
    except TemplateRaised as exc:
        return _failed(f"chat template error: {exc}")
    except OutputTooLong as exc:
        return {"error": str(exc), "kind": "too_long"}
    except MemoryError:
        return _failed(f"chat template failed to render: it needs more than "
                       f"{MEMORY_BYTES >> 20} MiB of memory")
    except RecursionError:
        return _failed("chat template failed to render: it recurses too deeply")
    except jinja2.TemplateError as exc:
        return _failed(f"chat template failed to render: {exc}")
    except Exception as exc:  # noqa: BLE001 - whatever a template does wrong is its error
        return _failed(f"chat template failed to render: {type(exc).__name__}: {exc}")


def _failed(message: str) -> dict[str, Any]:
    return {"error": message, "kind": "failed"}


# -- the child process ------------------------------------------------------------------------

def read_message(stream: BinaryIO) -> dict[str, Any] | None:
    """The next message on ``stream``; None at its end."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (length,) = HEADER.unpack(header)
    body = stream.read(length)
    if len(body) < length:
        return None
    message = json.loads(body)
    assert isinstance(message, dict)
    return message


def encode_message(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, ensure_ascii=True).encode("ascii")
    return HEADER.pack(len(body)) + body


def _limit_memory() -> None:
    import resource

    with open("/proc/self/statm") as handle:  # pages of address space in use
        in_use = int(handle.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (in_use + MEMORY_BYTES, in_use + MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _limit_cpu(seconds: float) -> None:
    """End this process (SIGXCPU) once it used ``seconds`` more of CPU time than now."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime + seconds)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.getrlimit(resource.RLIMIT_CPU)[1]))


def main() -> None:
    """Serve render requests on standard input until it ends."""
    try:
        _limit_memory()
    except (ImportError, OSError, ValueError):  # no such limits here: the parent's deadline
        pass
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(encode_message({"ready": True}))
    stdout.flush()
    while (request := read_message(stdin)) is not None:
        try:
            _limit_cpu(request["cpu_s"])
        except (ImportError, OSError, ValueError):
            pass
        stdout.write(encode_message(answer(request)))
        stdout.flush()
