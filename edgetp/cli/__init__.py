"""edgetp.cli."""

from edgetp.cli.main import main

__all__ = ["main"]
