"""How a command fails: an EdgetpError is one line, anything else keeps its traceback.

Every command runs inside :class:`EdgetpGroup`. A :class:`~edgetp.core.errors.EdgetpError` (a
mistake the user can fix: a flag, a file, a missing node) is printed as ``Error: MESSAGE; FIX``
with exit status 1; a usage error keeps click's status 2; any other exception is a bug in
edgetp and propagates with its traceback.
"""

from __future__ import annotations

import click

from edgetp.core.errors import EdgetpError


class EdgetpGroup(click.Group):
    """A click group whose commands' EdgetpErrors end the program with one line."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except EdgetpError as exc:
            raise click.ClickException(str(exc)) from exc


def is_request_failure(exc: BaseException) -> bool:
    """A request that failed in a way a long-running master reports and survives."""
    return isinstance(exc, EdgetpError) and isinstance(exc, RuntimeError)
