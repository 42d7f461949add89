"""The ``edgetp`` command line: thin click commands over the library (the top layer).

It may import every other subpackage, inside the commands; none may import it. ``edgetp`` and
``python -m edgetp.cli`` run :func:`main`.
"""

from edgetp.cli.main import main

__all__ = ["main"]
