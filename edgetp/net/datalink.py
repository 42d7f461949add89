"""The star allreduce's data link: one plain TCP connection per worker, beside ZeroMQ.

ZeroMQ hands every message to an I/O thread of each process, so a round trip wakes four
threads; on a loaded two-core machine that costs 80-400 us, against about 20 us for a TCP
socket written and read by the compute thread itself (``benchmarks/allreduce.py``). A token
makes two allreduces per layer, so the partials and sums travel here, while ZeroMQ keeps
everything else (handshake, steps, heartbeats, aborts, errors, stats).

Joining: a worker listens on an ephemeral port and puts it and a random token in its
``hello``; the master connects to the worker's address as ZeroMQ saw it, sends the magic and
the token, and says in its ``welcome`` whether the link is up. The worker then accepts the
connection carrying that token. Without it (CURVE on: the link is not encrypted; the ring
allreduce; ``EDGETP_DATA_LINK=0``; or a connection that fails) the allreduce stays on ZeroMQ.

A message is a fixed header, ``HEADER``: magic, op (partial or sum), wire format, seq, step,
index and the payload's length; then the payload, the wire format's tensors back to back
(``edgetp.net.codec``). Nothing else is parsed: the receiver knows the shape it expects, so
the length must be exactly that, and the payload is read straight into a preallocated
buffer. A header that does not match closes the link (:class:`DataLinkError`).
"""

from __future__ import annotations

import math
import secrets
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edgetp.core import settings
from edgetp.core.errors import EdgetpError
from edgetp.net.codec import FLOAT_WIRE
from edgetp.net.wire import tensor_bytes

MAGIC = b"ETd1"
HEADER = struct.Struct("<4sBBxxIIII")  # magic, op, wire, pad, seq, step, index, payload bytes
OP_PARTIAL, OP_SUM = 1, 2
WIRE_CODES = {"f32": 1, "bf16": 2, "int8": 3}
TOKEN_BYTES = 16
JOIN_TIMEOUT_S = 2.0
ENV_SWITCH = settings.ENV_DATA_LINK  # "0": keep the allreduce on ZeroMQ (for comparisons)
MAX_FIELD = 2**32 - 1


class DataLinkError(EdgetpError, ConnectionError):
    """The data link broke or carried something that is not the protocol; it is closed."""


def enabled() -> bool:
    return settings.data_link_enabled()


@dataclass(frozen=True)
class Received:
    op: int
    seq: int
    step: int
    index: int
    tensors: list[torch.Tensor]  # views on the link's buffer: valid until its next receive
    nbytes: int  # the message's bytes on the wire, header included


def payload_layout(wire: str, shape: Sequence[int]) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """The tensors of a ``[T, d]`` partial or sum in ``wire``, in payload order."""
    shape = tuple(shape)
    if wire == "int8":
        return [(torch.int8, shape), (torch.float32, (*shape[:-1], 1))]
    return [(FLOAT_WIRE[wire], shape)]


def _nbytes(layout: list[tuple[torch.dtype, tuple[int, ...]]]) -> int:
    return sum(math.prod(shape) * dtype.itemsize for dtype, shape in layout)


class DataLink:
    """One end of a connected data link. Not thread-safe: the compute thread owns it."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        self.sock = sock
        self._header = bytearray(HEADER.size)
        self._buffers: dict[int, list[bytearray]] = {}  # payload bytes -> two, used in turn
        self._turn = 0
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self.bytes_sent = 0
        self.bytes_received = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, op: int, wire: str, position: tuple[int, int, int],
             tensors: Sequence[torch.Tensor]) -> int:
        """Send one message (no copy: the tensors' memory goes to the kernel); its bytes."""
        payload = [tensor_bytes(t) for t in tensors]
        size = sum(len(p) for p in payload)
        seq, step, index = (min(v, MAX_FIELD) for v in position)
        parts = [memoryview(HEADER.pack(MAGIC, op, WIRE_CODES[wire], seq, step, index, size)),
                 *payload]
        try:
            while parts:
                sent = self.sock.sendmsg(parts)
                parts = _advance(parts, sent)
        except OSError as exc:
            raise DataLinkError(f"the data link broke while sending ({exc})") from exc
        self.bytes_sent += HEADER.size + size
        return HEADER.size + size

    def receive(self, wire: str, shape: Sequence[int], deadline: float) -> Received:
        """The next message, whose payload must be a ``[T, d]`` of ``wire`` (``shape``).

        The header and the payload are read together (one ``recvmsg_into`` in the usual case)
        into the header buffer and one of the reused payload buffers of the expected size.
        """
        layout = payload_layout(wire, shape)
        expected = _nbytes(layout)
        buffer = self._buffer(expected)
        header, payload = memoryview(self._header), memoryview(buffer)
        got = self._read_into([header, payload], deadline, stop_at=HEADER.size)
        magic, op, code, seq, step, index, size = HEADER.unpack(self._header)
        if magic != MAGIC or op not in (OP_PARTIAL, OP_SUM) or code != WIRE_CODES[wire]:
            raise DataLinkError(f"a message that is not the data-link protocol (magic {magic!r}, "
                                f"op {op}, wire {code})")
        if size != expected:
            raise DataLinkError(f"a payload of {size} bytes where {list(shape)} in {wire} "
                                f"takes {expected}")
        if got < HEADER.size + size:
            self._read_into([payload[got - HEADER.size:]], deadline)
        self.bytes_received += HEADER.size + size
        return Received(op, seq, step, index, _tensors(buffer, layout), HEADER.size + size)

    def _buffer(self, size: int) -> bytearray:
        """One of two reused buffers of ``size`` bytes, in turn (a result stays valid while the
        next message is read)."""
        pair = self._buffers.get(size)
        if pair is None:
            pair = self._buffers[size] = [bytearray(size), bytearray(size)]
        self._turn ^= 1
        return pair[self._turn]

    def _read_into(self, views: list[memoryview], deadline: float, stop_at: int = 0) -> int:
        """Fill ``views`` in order, or only their first ``stop_at`` bytes (more may come in the
        same read); returns the bytes read. Reads without blocking and waits with poll(2)."""
        total = sum(len(v) for v in views)
        want, got = (stop_at or total), 0
        try:
            while got < want:
                try:
                    n = self.sock.recvmsg_into(views, 0, socket.MSG_DONTWAIT)[0]
                except BlockingIOError:
                    self._wait_readable(deadline)
                    continue
                if n == 0:
                    raise DataLinkError("the peer closed the data link")
                got += n
                views = _advance(views, n)
        except DataLinkError:
            raise
        except OSError as exc:
            raise DataLinkError(f"the data link broke ({exc})") from exc
        return got

    def _wait_readable(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._poll.poll(max(1, int(remaining * 1000))):
            raise DataLinkError("the data link stalled in the middle of a message")

    def close(self) -> None:
        self.sock.close()


def _advance(parts: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of ``parts`` after ``sent`` bytes went out."""
    while parts and sent >= len(parts[0]):
        sent -= len(parts[0])
        parts = parts[1:]
    if parts and sent:
        parts = [parts[0][sent:], *parts[1:]]
    return parts


def _tensors(buffer: bytearray, layout: list[tuple[torch.dtype, tuple[int, ...]]]
             ) -> list[torch.Tensor]:
    out, offset = [], 0
    for dtype, shape in layout:
        size = _nbytes([(dtype, shape)])
        raw = memoryview(buffer)[offset:offset + size]
        if dtype == torch.bfloat16:
            tensor = torch.frombuffer(raw, dtype=torch.int16).view(torch.bfloat16)
        else:
            tensor = torch.frombuffer(raw, dtype=dtype)
        out.append(tensor.view(shape))
        offset += size
    return out


# -- joining -------------------------------------------------------------------------------------

class DataListener:
    """The worker's side of joining: a listening socket and the token the master must show."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.token = secrets.token_hex(TOKEN_BYTES)

    def accept(self, timeout_s: float = JOIN_TIMEOUT_S) -> DataLink:
        """The master's connection (the first one showing our token); DataLinkError if none."""
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                break
            conn.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                shown = _read_exactly(conn, len(MAGIC) + TOKEN_BYTES * 2)
            except OSError:
                shown = b""
            if shown == MAGIC + self.token.encode():
                return DataLink(conn)
            conn.close()  # not the master (or a stale attempt): keep waiting
        raise DataLinkError("the master did not open the data link")

    def close(self) -> None:
        self.sock.close()


def connect(host: str, port: int, token: str, timeout_s: float = JOIN_TIMEOUT_S) -> DataLink:
    """The master's side of joining: connect to a worker's listener and show its token."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
        sock.sendall(MAGIC + token.encode())
    except OSError as exc:
        raise DataLinkError(f"cannot open a data link to {host}:{port} ({exc})") from exc
    return DataLink(sock)


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data
