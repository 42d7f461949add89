"""Byte sizes as users write them (``1.5GiB``, ``800MB``) and as edgetp prints them."""

from __future__ import annotations

import math

from edgetp.core.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
          "tb": 1000**4, "tib": 1024**4}


def parse_bytes(text: str | int) -> int:
    """``"1.5GiB"`` -> 1610612736; plain numbers are bytes. Units: kB/MB/GB (1000s), KiB/MiB/GiB."""
    if isinstance(text, int):
        return text
    stripped = text.strip().replace(" ", "")
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = stripped[len(number):].lower()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value < 0 or not math.isfinite(value):
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 1.5GiB, 800MB or 2000000")
    return int(value * _UNITS[unit])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
