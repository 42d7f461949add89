"""Data links inside one process: a joined pair on loopback, as the master and a worker
hold them after the join (edgetp.net.datalink)."""

from __future__ import annotations

from typing import Any


def data_link_pair() -> tuple[Any, Any]:
    """(the master's end, the worker's end) of one plain data link on loopback."""
    from edgetp.net import datalink

    listener = datalink.DataListener()
    master = datalink.connect("127.0.0.1", listener.port, listener.token)
    worker = listener.accept()
    listener.close()
    return master, worker
