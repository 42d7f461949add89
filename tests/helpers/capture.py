"""A passive capture of the loopback interface: what a listener on the wire would see.

:class:`LoopbackCapture` reads every packet the kernel sends on ``lo`` through a raw
``AF_PACKET`` socket (it needs CAP_NET_RAW: tests skip without it) and keeps the TCP payloads
of the connections to or from the ports it is given, per direction, in order.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import defaultdict

import pytest

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # each loopback packet is seen twice: keep the sending side's copy
ETHERNET_HEADER = 14
RECEIVE_BUFFER = 32 << 20
MAX_CAPTURE = 256 << 20  # a runaway capture stops growing here
SO_RCVBUFFORCE = 33  # Linux: a receive buffer past rmem_max (root); Python does not name it


def raw_socket() -> socket.socket:
    """A raw socket on ``lo``; skips the test when this process may not open one."""
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    except (PermissionError, AttributeError, OSError) as exc:
        pytest.skip(f"no raw socket for a capture ({exc})")
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.bind(("lo", 0))
    sock.settimeout(0.1)
    return sock


class LoopbackCapture:
    """TCP payloads on ``lo`` whose source or destination port is in ``ports``, by
    (source port, destination port), while it runs (a context manager)."""

    def __init__(self, ports: set[int]) -> None:
        self.ports = ports
        self.flows: dict[tuple[int, int], bytearray] = defaultdict(bytearray)
        self.size = 0
        self._sock = raw_socket()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lo-capture")

    def __enter__(self) -> LoopbackCapture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set() and self.size < MAX_CAPTURE:
            try:
                packet, address = self._sock.recvfrom(1 << 18)
            except TimeoutError:
                continue
            except OSError:
                return
            if address[2] == PACKET_OUTGOING:
                self._keep(memoryview(packet)[ETHERNET_HEADER:])

    def _keep(self, ip: memoryview) -> None:
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
            return
        ip = ip[:struct.unpack_from("!H", ip, 2)[0]]  # the IP packet's own length
        tcp = ip[(ip[0] & 0x0F) * 4:]
        source, destination = struct.unpack_from("!HH", tcp)
        if source in self.ports or destination in self.ports:
            payload = tcp[(tcp[12] >> 4) * 4:]
            self.flows[(source, destination)] += payload
            self.size += len(payload)

    def everything(self) -> bytes:
        """Every flow's bytes, one after the other."""
        return b"".join(bytes(flow) for flow in self.flows.values())
