"""The errors a user meets: one :class:`EdgetpError` base and the kinds the CLI prints.

An :class:`EdgetpError` is a failure the user can act on: a wrong flag or file, a split that
does not fit the request, a node that is missing, a key that cannot be read. Its text says what
is wrong and, in :attr:`~EdgetpError.fix`, what to do; ``edgetp`` prints it as one line and
exits with status 1. Any other exception is a bug in edgetp and keeps its traceback.

Each kind keeps the builtin base it had before the base existed (a :class:`ConfigError` is
still a :class:`ValueError`, a :class:`ClusterError` a :class:`RuntimeError`), so code that
catches the builtin goes on working. Modules of the upper layers define narrower kinds as
subclasses of these (``QuantError(ConfigError)``, ``LaunchError(ClusterError)``, ...).
"""

from __future__ import annotations


class EdgetpError(Exception):
    """A failure the user can act on; ``fix`` (may be empty) says what to do."""

    def __init__(self, message: str = "", fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message

    def __reduce__(self) -> tuple[type[EdgetpError], tuple[str, str]]:
        return type(self), (self.message, self.fix)


class ConfigError(EdgetpError, ValueError):
    """An input the user gave is wrong (a flag, a file, a request); the text says how to fix it."""


class ModelError(EdgetpError, ValueError):
    """A model directory (checkpoint, tokenizer) is missing, incomplete or not supported."""


class ShardError(EdgetpError, ValueError):
    """A split is missing, incomplete, corrupted, or made for another model or plan."""


class ClusterError(EdgetpError, RuntimeError):
    """The cluster cannot serve: a node is missing, dead, refused or misbehaving."""


class SecurityError(EdgetpError, ValueError):
    """Keys are missing, unreadable or do not match; the text says which file and what to do."""
