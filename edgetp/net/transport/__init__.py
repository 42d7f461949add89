"""The transport: ZeroMQ sockets between the master (ROUTER, binds) and its workers (DEALER).

It owns the handshake (protocol version, model fingerprint, plan, rank, shard dtype),
heartbeats, timeouts and message counters, and knows nothing of models:

- :mod:`.master` / :mod:`.worker`: each side's socket and its view of the other side;
- :mod:`.handshake`: what a worker proves, why it is refused, heartbeats, the clock estimate;
- :mod:`.sockets`: socket limits and receiving with a deadline (shared with the ring);
- :mod:`.traffic`: message and byte counters; :mod:`.errors`: what the cluster raises.

The names below are the transport's public face; callers import them from here.
"""

from edgetp.net.transport.errors import (
    ClusterError,
    HandshakeRefused,
    ShutdownRequested,
    StepAborted,
)
from edgetp.net.transport.handshake import NodeIdentity
from edgetp.net.transport.master import MasterTransport, Peer
from edgetp.net.transport.traffic import Traffic
from edgetp.net.transport.worker import WorkerTransport

__all__ = [
    "ClusterError",
    "HandshakeRefused",
    "MasterTransport",
    "NodeIdentity",
    "Peer",
    "ShutdownRequested",
    "StepAborted",
    "Traffic",
    "WorkerTransport",
]
