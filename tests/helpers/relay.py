"""A TCP man in the middle on loopback: it forwards bytes both ways, keeps a copy of all it
saw, and may change what goes from the client to the server (``tamper``)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from edgetp.runtime.local import free_port

Tamper = Callable[[bytes], bytes]  # a chunk from the client -> what the server gets


class Relay:
    """Listens on a free port and relays each connection to ``target_port``."""

    def __init__(self, target_port: int, tamper: Tamper | None = None) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.tamper = tamper
        self.captured = bytearray()
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b, change in ((client, upstream, self.tamper), (upstream, client, None)):
                threading.Thread(target=self._pump, args=(a, b, change), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, change: Tamper | None) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                break
            if not data:
                break
            self.captured += data
            try:
                sink.sendall(change(data) if change else data)
            except OSError:
                break
        for sock in (source, sink):
            sock.close()

    def close(self) -> None:
        self.server.close()
