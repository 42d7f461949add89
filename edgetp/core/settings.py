"""Every ``EDGETP_*`` environment variable: its name, default and meaning, and the one reader.

edgetp reads the environment here and nowhere else; other modules call the accessors below
(each reads ``os.environ`` when called, so a variable set by a test or a parent process takes
effect at once). :data:`VARIABLES` lists every variable, including those only the shell
scripts read (``docker/entrypoint.sh``, ``docker/compose.yaml``, ``launch/*.sh``), and
:func:`markdown_table` renders it for ``docs/configuration.md``.

:func:`environment` sets variables for a block of code: the transport reads the link-emulation
variables when it is made, so ``launch`` and ``bench`` make theirs inside it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgetp.core.errors import ConfigError


@dataclass(frozen=True)
class Variable:
    """One environment variable: ``default`` is what unset means, ``reader`` who reads it."""

    name: str
    default: str
    meaning: str
    reader: str = "edgetp"


ENV_CACHE = "EDGETP_CACHE"
ENV_KERNEL_CACHE = "EDGETP_KERNEL_CACHE"
ENV_NATIVE_KERNELS = "EDGETP_NATIVE_KERNELS"
ENV_KERNEL_TARGET = "EDGETP_KERNEL_TARGET"
ENV_QUANT_KERNELS = "EDGETP_QUANT_KERNELS"
ENV_DATA_LINK = "EDGETP_DATA_LINK"
ENV_SPIN = "EDGETP_SPIN_US"
DEFAULT_SPIN_US = 500
ENV_LOG = "EDGETP_LOG"
ENV_API_KEY = "EDGETP_API_KEY"
ENV_DELAY = "EDGETP_LINK_DELAY_MS"
ENV_JITTER = "EDGETP_LINK_JITTER_MS"
ENV_DESCRIPTION = "EDGETP_LINK_EMULATION"
ENV_PROFILE = "EDGETP_LINK_PROFILE"
ENV_PROFILES_FILE = "EDGETP_LINK_PROFILES"
ENV_LINK_DEV = "EDGETP_LINK_DEV"
ENV_PYTHON = "EDGETP_PYTHON"
ENV_SHARDS = "EDGETP_SHARDS"
ENV_API_PORT = "EDGETP_API_PORT"
ENV_EXECUTABLE = "EDGETP"
# what a testbed node's environment says of its link (the Docker testbed reports them)
LINK_VARIABLES = (ENV_DELAY, ENV_JITTER, ENV_DESCRIPTION, ENV_PROFILE, ENV_PROFILES_FILE,
                  ENV_LINK_DEV)

_ENTRYPOINT = "docker/entrypoint.sh"
VARIABLES: tuple[Variable, ...] = (
    Variable(ENV_CACHE, "~/.cache/edgetp",
             "Root of edgetp's caches on this machine; `generate --nodes N` and `bench` keep "
             "their splits in `$EDGETP_CACHE/splits/`."),
    Variable(ENV_KERNEL_CACHE, "~/.cache/edgetp/kernels",
             "Where the native decode kernels are compiled to (one library per source, "
             "compiler, flags and CPU)."),
    Variable(ENV_NATIVE_KERNELS, "1",
             "`0` turns the native C decode kernels off: one-row products stay with torch "
             "(for comparisons)."),
    Variable(ENV_KERNEL_TARGET, "native",
             "CPU the native decode kernels are compiled for, as gcc's `-march` names it: "
             "`native` (this CPU's own), or an older target this CPU runs, e.g. `x86-64-v3` "
             "(AVX2 + FMA, to exercise the AVX2 paths on an AVX-512 machine) or `x86-64-v2`. "
             "Each target is cached apart."),
    Variable(ENV_QUANT_KERNELS, "1",
             "`0` makes int8/int4 linears use the exact reference everywhere: dequantize, then "
             "a dense matmul in the activations' dtype (for comparisons)."),
    Variable(ENV_DATA_LINK, "1",
             "`0` keeps the star allreduce on ZeroMQ instead of the raw-TCP data link "
             "(for comparisons)."),
    Variable(ENV_SPIN, str(DEFAULT_SPIN_US),
             "Microseconds an allreduce watches its data links without sleeping before it "
             "blocks in poll(2) (a sleep and a wake-up cost 100-200 us a round trip); `0` "
             "blocks at once, for devices whose cores other work needs."),
    Variable(ENV_LOG, "INFO",
             "Log level of `worker`, `master`, `serve` and the testbed's master (DEBUG, INFO, "
             "WARNING, ...)."),
    Variable(ENV_API_KEY, "(none)",
             "Default of `--api-key`: `serve` requires `Authorization: Bearer KEY`, `chat --url` "
             "sends it."),
    Variable(ENV_DELAY, "0",
             "Link emulation: milliseconds the transport waits before each data message it "
             "sends (one traversal). Set by `launch --emulate-links`, `bench --link`, the "
             "testbeds and the Docker entrypoint."),
    Variable(ENV_JITTER, "0",
             "Link emulation: +- jitter, in milliseconds, around `EDGETP_LINK_DELAY_MS`."),
    Variable(ENV_DESCRIPTION, "none",
             "Link emulation in force on this node, as text; every bench and testbed report "
             "states it."),
    Variable(ENV_PROFILES_FILE, "(the built-in profiles)",
             "YAML file of link profiles for `python -m edgetp.ops.linkemu` (and the Docker "
             "image)."),
    Variable(ENV_PROFILE, "(no emulation)",
             "Link profile the container applies at start (tpi-llm, home-wifi, gigabit, or one "
             "of `EDGETP_LINK_PROFILES`).", _ENTRYPOINT),
    Variable(ENV_LINK_DEV, "eth0", "Network interface the container shapes with tc.",
             _ENTRYPOINT),
    Variable(ENV_PYTHON, "python3", "Interpreter that has edgetp installed.", _ENTRYPOINT),
    Variable(ENV_SHARDS, "./shards", "Split directory mounted into the containers.",
             "docker/compose.yaml"),
    Variable(ENV_API_PORT, "8000", "Host port on which the Docker testbed publishes the "
             "master's API.", "docker/compose.yaml"),
    Variable(ENV_EXECUTABLE, "edgetp", "The `edgetp` command the launch scripts run.",
             "launch/*.sh"),
)


def _read(name: str, environ: Mapping[str, str] | None = None) -> str:
    """The variable's value, ``""`` when unset."""
    return (os.environ if environ is None else environ).get(name, "")


def _switch(name: str) -> bool:
    """A switch that is on unless set to ``0``."""
    return _read(name) != "0"


def cache_dir() -> Path:
    """``$EDGETP_CACHE``, default ``~/.cache/edgetp``."""
    return Path(_read(ENV_CACHE) or Path.home() / ".cache" / "edgetp")


def kernel_cache_dir() -> Path:
    """``$EDGETP_KERNEL_CACHE``, default ``~/.cache/edgetp/kernels``."""
    return Path(_read(ENV_KERNEL_CACHE) or Path.home() / ".cache" / "edgetp" / "kernels")


def native_kernels_enabled() -> bool:
    return _switch(ENV_NATIVE_KERNELS)


def kernel_target() -> str:
    """``$EDGETP_KERNEL_TARGET`` (a ``-march`` value), default ``native``; ConfigError when it is
    not one word of the characters such names use."""
    target = _read(ENV_KERNEL_TARGET).strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]*", target):
        raise ConfigError(f"{ENV_KERNEL_TARGET}={target!r} is not a CPU target: give a -march "
                          "name such as native, x86-64-v3 or armv8.2-a+dotprod")
    return target


def quant_kernels_enabled() -> bool:
    return _switch(ENV_QUANT_KERNELS)


def data_link_enabled() -> bool:
    return _switch(ENV_DATA_LINK)


def spin_seconds() -> float:
    """``$EDGETP_SPIN_US`` in seconds (default :data:`DEFAULT_SPIN_US` us); ConfigError when it
    is not a number of microseconds from 0 to 1,000,000."""
    text = _read(ENV_SPIN).strip() or str(DEFAULT_SPIN_US)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1e6:
        raise ConfigError(f"{ENV_SPIN}={text!r} is not a number of microseconds from 0 to "
                          "1000000: give e.g. 500, or 0 to block at once")
    return value / 1e6


def spin_given() -> bool:
    """Whether ``$EDGETP_SPIN_US`` is set (a local cluster then leaves it as it is)."""
    return bool(_read(ENV_SPIN).strip())


def log_level() -> str:
    return _read(ENV_LOG) or "INFO"


def configure_logging() -> None:
    """Log to standard error at ``$EDGETP_LOG``, each line with the process id (node logs)."""
    import logging

    logging.basicConfig(level=log_level(),
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")


def api_key() -> str | None:
    """``$EDGETP_API_KEY``; ``None`` when unset or empty."""
    return _read(ENV_API_KEY) or None


def link_emulation() -> str:
    """The description of the link emulation in force, ``"none"`` without one."""
    return _read(ENV_DESCRIPTION) or "none"


def link_profiles_file() -> str | None:
    return _read(ENV_PROFILES_FILE) or None


def link_delay_ms(environ: Mapping[str, str] | None = None) -> tuple[float, float]:
    """``(delay, jitter)`` in ms from ``EDGETP_LINK_DELAY_MS`` / ``_JITTER_MS`` (unset: 0)."""
    values = []
    for key in (ENV_DELAY, ENV_JITTER):
        text = _read(key, environ).strip() or "0"
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not a number of milliseconds") from None
        if value < 0:
            raise ConfigError(f"{key}={text!r} must be >= 0")
        values.append(value)
    return values[0], values[1]


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` set in ``os.environ`` for the code inside; the previous values restored after."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def markdown_table() -> str:
    """The table of :data:`VARIABLES` for the docs."""
    rows = ["| Variable | Default | Read by | Meaning |", "|---|---|---|---|"]
    rows += [f"| `{v.name}` | {_code(v.default)} | {v.reader} | {v.meaning} |"
             for v in VARIABLES]
    return "\n".join(rows)


def _code(default: str) -> str:
    return default if default.startswith("(") else f"`{default}`"
