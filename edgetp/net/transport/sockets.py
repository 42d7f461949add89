"""ZeroMQ socket setup shared by every cluster socket: the context, size limits, keepalive,
and receiving one multipart message with a deadline."""

from __future__ import annotations

from typing import Any

import zmq

MAX_MESSAGE_BYTES = 32 << 20  # a peer sending a bigger frame is disconnected by ZeroMQ
RECEIVE_QUEUE = 64  # messages queued per peer before ZeroMQ drops (bounds hostile floods)


def make_context() -> zmq.Context:
    return zmq.Context.instance()


def configure_socket(sock: zmq.Socket) -> None:
    """The limits every edgetp socket runs with: no linger, bounded messages and queue."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 10)


def receive_frames(sock: zmq.Socket, poller: zmq.Poller, timeout_s: float) -> list[Any] | None:
    """One multipart message, waiting up to ``timeout_s``; None on timeout.

    Tries a non-blocking receive first (a message is often already queued) and polls with a
    reused poller otherwise (``Socket.poll`` builds a new one on every call).
    """
    try:
        return sock.recv_multipart(zmq.NOBLOCK, copy=False)
    except zmq.Again:
        pass
    if timeout_s <= 0 or not poller.poll(max(1, int(timeout_s * 1000))):
        return None
    return sock.recv_multipart(copy=False)


def peer_ip(frame: Any) -> str:
    """The sender's IP address as ZeroMQ saw it (for the ring), or loopback if unknown."""
    try:
        return str(frame.get("Peer-Address")) or "127.0.0.1"
    except (zmq.ZMQError, AttributeError):
        return "127.0.0.1"
