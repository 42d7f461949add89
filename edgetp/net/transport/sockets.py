"""ZeroMQ socket setup shared by every cluster socket: the context, size limits, keepalive,
receiving one multipart message with a deadline, and the addresses a node listens on (the
interface it reaches its master from, never every interface)."""

from __future__ import annotations

import socket
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


def url_host_port(url: str) -> tuple[str, int]:
    """``(HOST, PORT)`` of ``tcp://HOST:PORT``."""
    host, _, port = url.removeprefix("tcp://").rpartition(":")
    return host.strip("[]"), int(port)


def local_address_towards(url: str) -> str:
    """This machine's IPv4 address on the interface that reaches the host of ``url`` (the
    route the kernel picks; nothing is sent): what a node binds its listeners to, so that they
    are open on the cluster's network only (loopback for a loopback cluster). OSError if the
    host does not resolve or has no route."""
    host, port = url_host_port(url)
    address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(address)
        return str(probe.getsockname()[0])
