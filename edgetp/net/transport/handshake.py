"""The contract a worker and its master agree on when it joins, and keep while it stays.

A worker says ``hello`` with its :class:`NodeIdentity`; the master answers ``welcome`` (the
session, the wire format, the allreduce) or ``refuse`` with the :func:`refusal` reason. Both
sides then ping at :data:`HEARTBEAT_S`, and the worker estimates the master's clock from the
pongs (:class:`ClockEstimate`) so its timing spans line up with the master's.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

HEARTBEAT_S = 1.0
CLOCK_SYNC_PINGS = 8  # pings right after the welcome, to estimate the clock offset


@dataclass(frozen=True)
class NodeIdentity:
    """What a worker proves about itself in the handshake."""

    rank: int
    fingerprint: str
    plan: str  # the plan's canonical JSON
    dtype: str
    kv_slots: int = 1  # the sequences whose keys and values it can hold at once

    def hello_fields(self, data_port: int = 0, data_token: str = "", data_key: str = "",
                     data_ciphers: str = "") -> dict[str, Any]:
        """The hello; the data link's listener (port, token) and, with keys, the worker's
        fresh key and ciphers for it (edgetp.net.linkkeys)."""
        from edgetp import __version__

        return {"rank": self.rank, "fingerprint": self.fingerprint, "plan": self.plan,
                "dtype": self.dtype, "pid": os.getpid(), "host": socket.gethostname(),
                "version": __version__, "time": time.time(), "data_port": data_port,
                "data_token": data_token, "data_key": data_key, "data_ciphers": data_ciphers,
                "kv_slots": self.kv_slots}


def refusal(expected: NodeIdentity, n_ranks: int, hello: dict[str, Any]) -> str | None:
    """Why a master expecting ``expected`` of an ``n_ranks``-node cluster refuses a ``hello``
    (None: it is welcome)."""
    if hello["rank"] not in range(1, n_ranks):
        return (f"rank {hello['rank']} is not a worker rank of this {n_ranks}-node "
                f"cluster (expected 1..{n_ranks - 1})")
    if hello["fingerprint"] != expected.fingerprint:
        return ("the shard is of a different model than the master's (fingerprint "
                f"{hello['fingerprint'][:12]} != {expected.fingerprint[:12]}); re-split")
    if hello["plan"] != expected.plan:
        return "the shard was split with a different plan (nodes, shares or private layers)"
    if hello["dtype"] != expected.dtype:
        return f"the shard is stored as {hello['dtype']}, the master's as {expected.dtype}"
    return None


@dataclass
class ClockEstimate:
    """The master's clock minus ours, from the exchange with the smallest round trip (its
    reply is least likely to have waited), assuming the reply took half of it."""

    offset_s: float = 0.0
    best_rtt_s: float = float("inf")

    def sample(self, master_time: float, sent_at: float) -> None:
        """One exchange: we sent at ``sent_at`` (our clock), the master stamped ``master_time``."""
        received = time.time()
        rtt = received - sent_at
        if rtt < self.best_rtt_s:
            self.best_rtt_s = rtt
            self.offset_s = master_time - (sent_at + received) / 2
