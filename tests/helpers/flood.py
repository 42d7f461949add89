"""A flood at one TCP port, from a process of its own (run this file as a script).

``python flood.py HOST PORT --messages N --size BYTES`` opens ZeroMQ peers that push N
messages of BYTES each (one with no credentials, one with a wrong PLAIN token, one with an
unknown CURVE key against a made-up server key) and raw TCP connections that send BYTES of
garbage; it exits once everything went out or its peers were refused (``--seconds`` at most).
Only the standard library and pyzmq: it imports nothing of edgetp or the tests.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import zmq


def zmq_peers(address: str) -> list[zmq.Socket]:
    context = zmq.Context.instance()
    peers = []
    for setup in ("null", "plain", "curve"):
        sock = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        if setup == "plain":
            sock.plain_username, sock.plain_password = b"edgetp", b"0" * 32
        elif setup == "curve":
            public, secret = zmq.curve_keypair()
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = zmq.curve_keypair()[0]
        sock.connect(address)
        peers.append(sock)
    return peers


def push(peers: list[zmq.Socket], messages: int, size: int) -> None:
    payload = os.urandom(size)
    for _ in range(messages):
        for sock in peers:
            try:
                sock.send_multipart([b"\x84\xa1v\x04", payload], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass


def garbage(host: str, port: int, size: int, deadline: float) -> None:
    """Random bytes down raw TCP connections until ``size`` went or the peer hung up."""
    for _ in range(3):
        try:
            with socket.create_connection((host, port), timeout=2) as conn:
                sent, block = 0, os.urandom(1 << 20)
                while sent < size and time.monotonic() < deadline:
                    conn.sendall(block)
                    sent += len(block)
        except OSError:
            pass  # refused, reset or timed out: the listener would not have it


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--size", type=int, default=30 << 20)
    parser.add_argument("--seconds", type=float, default=20.0)
    options = parser.parse_args()
    deadline = time.monotonic() + options.seconds
    peers = zmq_peers(f"tcp://{options.host}:{options.port}")
    push(peers, options.messages, options.size)
    garbage(options.host, options.port, options.size, deadline)
    for sock in peers:  # what a listener took has gone; what it refused is dropped
        sock.close(linger=max(0, int((deadline - time.monotonic()) * 1000)) // 2)
    zmq.Context.instance().term()


if __name__ == "__main__":
    main()
