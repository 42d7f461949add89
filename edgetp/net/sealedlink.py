"""The data link of a cluster with keys: every message encrypted and authenticated.

:class:`SealedDataLink` is a :class:`~edgetp.net.datalink.DataLink` whose payloads are sealed
with the connection's own keys (edgetp.net.linkkeys: agreed over the CURVE channel when the
worker joins). A message is :data:`SEALED_HEADER` in clear (magic, op, wire format, seq, step,
index, the sealed payload's length, and the message's counter), then the payload encrypted,
then its 16-byte tag; the tag covers the header too, so none of it can be changed unseen. The
counter is the nonce and must be exactly the next one of its direction.

Anything wrong (a header that is not the protocol, a length that is not the expected shape's,
a counter out of turn, a tag that does not verify) closes the link and forgets its keys
before :class:`~edgetp.net.datalink.DataLinkError` is raised, so nothing the message carried
is used. The decrypted payload lands in the link's reused buffers, as the plain link's does.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

import torch

from edgetp.net.datalink import (
    MAX_FIELD,
    WIRE_CODES,
    DataLink,
    DataLinkError,
    Received,
    ReusedBuffers,
    _nbytes,
    _tensors,
    check_header,
    payload_layout,
)
from edgetp.net.linkkeys import TAG_BYTES, LinkCipher, LinkKeyError
from edgetp.net.wire import tensor_bytes

SEALED_MAGIC = b"ETs1"
# magic, op, wire, pad, seq, step, index, sealed payload bytes (tag included), counter
SEALED_HEADER = struct.Struct("<4sBBxxIIIIQ")


class SealedDataLink(DataLink):
    """One end of a data link sealed with ``cipher`` (this end's keys and counters)."""

    def __init__(self, sock: socket.socket, cipher: LinkCipher) -> None:
        super().__init__(sock)
        self.cipher = cipher
        self._sealed_header = bytearray(SEALED_HEADER.size)
        self._outgoing = ReusedBuffers(1)  # sealed bytes
        self._incoming = ReusedBuffers(1)

    @property
    def exchanges_natively(self) -> bool:
        """No: every message is sealed in Python (:meth:`send`, :meth:`receive`)."""
        return False

    @classmethod
    def over(cls, link: DataLink, cipher: LinkCipher) -> SealedDataLink:
        """Seal a link just joined (its socket is taken over)."""
        return cls(link.sock, cipher)

    def send(self, op: int, wire: str, position: tuple[int, int, int],
             tensors: Sequence[torch.Tensor]) -> int:
        """Seal and send one message; its bytes on the wire."""
        payload = [tensor_bytes(t) for t in tensors]
        data = payload[0] if len(payload) == 1 else memoryview(b"".join(payload))
        sealed = self._outgoing.take(len(data) + TAG_BYTES)
        seq, step, index = (min(v, MAX_FIELD) for v in position)
        counter = self.cipher.sent
        header = SEALED_HEADER.pack(SEALED_MAGIC, op, WIRE_CODES[wire], seq, step, index,
                                    len(sealed), counter)
        try:
            self.cipher.seal_into(counter, header, data, sealed)
        except LinkKeyError as exc:
            self.close()
            raise DataLinkError(str(exc)) from exc
        self._send_all([memoryview(header), memoryview(sealed)])
        self.bytes_sent += len(header) + len(sealed)
        return len(header) + len(sealed)

    def receive(self, wire: str, shape: Sequence[int], deadline: float,
                current: tuple[int, int] | None = None) -> Received:
        """The next message, opened; it must carry a ``[T, d]`` of ``wire`` (``shape``).
        Any fault closes the link (DataLinkError), a stale message of another size too
        (``current`` is not used: the worker rejoins on a fresh link)."""
        try:
            return self._receive(wire, shape, deadline)
        except (DataLinkError, LinkKeyError) as exc:
            self.close()
            raise DataLinkError(str(exc)) from exc

    def _receive(self, wire: str, shape: Sequence[int], deadline: float) -> Received:
        layout = payload_layout(wire, shape)
        plain_size = _nbytes(layout)
        sealed = self._incoming.take(plain_size + TAG_BYTES)
        got = self._read_into([memoryview(self._sealed_header), sealed], deadline,
                              stop_at=SEALED_HEADER.size)
        magic, op, code, seq, step, index, size, counter = SEALED_HEADER.unpack(
            self._sealed_header)
        check_header((magic, op, code, size), (SEALED_MAGIC, wire, len(sealed)), shape)
        if got < SEALED_HEADER.size + size:
            self._read_into([sealed[got - SEALED_HEADER.size:]], deadline)
        plain = self._payloads.take(plain_size)
        self.cipher.open_into(counter, self._sealed_header, sealed, plain)
        self.bytes_received += SEALED_HEADER.size + size
        return Received(op, seq, step, index, _tensors(plain, layout), SEALED_HEADER.size + size)

    def close(self) -> None:
        self.cipher.forget()
        super().close()

