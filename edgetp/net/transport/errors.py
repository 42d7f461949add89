"""The failures a cluster node meets on the wire: what the transport and the collectives raise."""

from __future__ import annotations

from edgetp.core.errors import ClusterError

__all__ = ["ClusterError", "HandshakeRefused", "ShutdownRequested", "StepAborted"]


class HandshakeRefused(ClusterError):
    """The master refused this worker; the reason says what does not match."""


class StepAborted(RuntimeError):
    """The master abandoned the request this worker was computing."""


class ShutdownRequested(RuntimeError):
    """The master told this worker to exit."""
