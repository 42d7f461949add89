"""The failures a cluster node meets on the wire: what the transport and the collectives raise."""

from __future__ import annotations


class ClusterError(RuntimeError):
    """The cluster cannot serve the request (a node is missing, dead or misbehaving)."""


class HandshakeRefused(ClusterError):
    """The master refused this worker; the reason says what does not match."""


class StepAborted(RuntimeError):
    """The master abandoned the request this worker was computing."""


class ShutdownRequested(RuntimeError):
    """The master told this worker to exit."""
