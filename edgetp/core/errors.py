"""edgetp.core.errors."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration a user supplied is wrong; the message says how to fix it."""
