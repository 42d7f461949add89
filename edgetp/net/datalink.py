"""The star allreduce's data link: one plain TCP connection per worker, beside ZeroMQ.

ZeroMQ hands every message to an I/O thread of each process, so a round trip wakes four
threads; on a loaded two-core machine that costs 80-400 us, against about 20 us for a TCP
socket written and read by the compute thread itself (``benchmarks/allreduce.py``). A token
makes two allreduces per layer, so the partials and sums travel here, while ZeroMQ keeps
everything else (handshake, steps, heartbeats, aborts, errors, stats).

Joining: a worker listens on the address it reaches the master from (the cluster's interface,
never every interface), on an ephemeral port or the one ``--data-port`` fixes, and puts the
port and a random token in its ``hello``; the master connects to the worker's address as
ZeroMQ saw it, sends the magic and the token, and says in its ``welcome`` whether the link is
up. The worker then accepts the connection carrying that token: it reads every connection that
arrives side by side, and closes one that shows anything else or nothing within
:data:`TOKEN_DEADLINE_S`, so a connection made first (silent, or hostile) cannot hold up the
master's. Without it (the ring allreduce; ``EDGETP_DATA_LINK=0``; or a connection that
fails) the allreduce stays on ZeroMQ. With the cluster's CURVE keys the link is a
:class:`~edgetp.net.sealedlink.SealedDataLink`: every message encrypted and authenticated with
keys agreed for that one connection (edgetp.net.linkkeys); the token, which then travels inside
CURVE, still decides which connection is the master's.

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
import selectors
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edgetp.core import settings
from edgetp.core.errors import EdgetpError
from edgetp.kernels import native
from edgetp.net.codec import FLOAT_WIRE, scale_shape
from edgetp.net.wire import tensor_bytes

MAGIC = b"ETd1"
HEADER = struct.Struct("<4sBBxxIIII")  # magic, op, wire, pad, seq, step, index, payload bytes
OP_PARTIAL, OP_SUM = 1, 2
WIRE_CODES = {"f32": 1, "bf16": 2, "int8": 3}
TOKEN_BYTES = 16
JOIN_TIMEOUT_S = 2.0
TOKEN_DEADLINE_S = 0.5  # a connection shows the token this soon after it is accepted, or goes
PENDING_MAX = 16  # connections read at once while joining; beyond that the oldest goes
LISTEN_BACKLOG = 64
ENV_SWITCH = settings.ENV_DATA_LINK  # "0": keep the allreduce on ZeroMQ (for comparisons)
MAX_FIELD = 2**32 - 1
EXCHANGE_MAX_BYTES = 64 << 10  # the largest payload a native exchange sends (a decode batch's
# partial of 8 rows at width 2048): both ends send before they read, so a message must fit the
# sockets' buffers (a prefill chunk's partial takes the usual path)


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
        return [(torch.int8, shape), (torch.float32, scale_shape(shape))]
    return [(FLOAT_WIRE[wire], shape)]


def _nbytes(layout: list[tuple[torch.dtype, tuple[int, ...]]]) -> int:
    return sum(math.prod(shape) * dtype.itemsize for dtype, shape in layout)


class ReusedBuffers:
    """``count`` byte buffers used in turn, each as large as the largest message it held: a
    message of any size takes a prefix of the next one.

    One pair per message size instead (what the link kept before) grows with every prompt
    length a node ever sees: two buffers per link per length, up to the 128-row prefill chunk
    of 4 MiB in float32 at a 70B model's width, and on the star's master seven links.
    """

    def __init__(self, count: int) -> None:
        self._buffers = [bytearray(0) for _ in range(count)]
        self._turn = 0

    def take(self, size: int) -> memoryview:
        """The next buffer's first ``size`` bytes (the buffer grows to ``size`` if smaller; a
        result of an earlier call keeps the old one alive as long as it is used)."""
        self._turn = (self._turn + 1) % len(self._buffers)
        if len(self._buffers[self._turn]) < size:
            self._buffers[self._turn] = bytearray(size)
        return memoryview(self._buffers[self._turn])[:size]

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self._buffers)


class ExchangeBuffers:
    """The native exchange's messages: ``count`` uint8 tensors used in turn (a result stays
    valid while the next is read), each as large as the largest message it held, with the
    float32 view of a payload of each shape kept (made anew when its buffer grows): viewing
    costs tensor calls an allreduce would make 44 times a token."""

    def __init__(self, count: int) -> None:
        self._buffers = [torch.empty(0, dtype=torch.uint8) for _ in range(count)]
        self._views: list[dict[tuple[int, ...], torch.Tensor]] = [{} for _ in range(count)]
        self._turn = 0

    def take(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The next buffer (header and a float32 payload of ``shape``) and its payload view."""
        self._turn = turn = (self._turn + 1) % len(self._buffers)
        view = self._views[turn].get(shape)
        if view is None:
            size = HEADER.size + 4 * math.prod(shape)
            if self._buffers[turn].numel() < size:
                self._buffers[turn] = torch.empty(size, dtype=torch.uint8)
                self._views[turn] = {}
            view = self._buffers[turn][HEADER.size:size].view(torch.float32).view(shape)
            self._views[turn][shape] = view
        return self._buffers[turn], view


class DataLink:
    """One end of a connected data link. Not thread-safe: the compute thread owns it."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        self.sock = sock
        self._header = bytearray(HEADER.size)
        self._payloads = ReusedBuffers(2)  # used in turn: a result stays valid while the
        # next message is read
        self._carry = bytearray()  # bytes read past a skipped message: the next one's start
        self._exchange_buffers = ExchangeBuffers(2)  # native exchanges' messages, used in turn
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self.bytes_sent = 0
        self.bytes_received = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def exchanges_natively(self) -> bool:
        """Whether :meth:`exchange` can run here (a plain link, the C library loaded)."""
        return native.available()

    def exchange(self, position: tuple[int, int, int], own: torch.Tensor, spin_s: float
                 ) -> torch.Tensor | None:
        """One end of a two-rank exchange in one native call (``csrc/spinwait.c``): send
        ``own`` (a float32 ``[T, d]`` partial, contiguous) as this allreduce's OP_PARTIAL and,
        when the peer's partial of the same allreduce comes within ``spin_s``, return the sum
        (float32 ``[T, d]`` in a reused buffer: valid until the next receive but one), the
        same bits :func:`~edgetp.net.codec.pair_sum` gives. None when it did not come in time
        or another message came first: the bytes read so far stay the start of the link's
        next message, for :meth:`receive`. Raises DataLinkError when the link broke."""
        seq, step, index = (min(v, MAX_FIELD) for v in position)
        size = own.numel() * 4
        header = HEADER.pack(MAGIC, OP_PARTIAL, WIRE_CODES["f32"], seq, step, index, size)
        into, total = self._exchange_buffers.take(tuple(own.shape))
        try:
            got, summed = native.exchange_f32(self.sock.fileno(), header, own, into, spin_s)
        except OSError as exc:
            raise DataLinkError(f"the data link broke ({exc.strerror})") from exc
        self.bytes_sent += HEADER.size + size
        if not summed:
            self._carry += into[:got].numpy().tobytes()  # the next message's first bytes
            return None
        self.bytes_received += HEADER.size + size
        return total

    def send(self, op: int, wire: str, position: tuple[int, int, int],
             tensors: Sequence[torch.Tensor]) -> int:
        """Send one message (no copy: the tensors' memory goes to the kernel); its bytes."""
        payload = [tensor_bytes(t) for t in tensors]
        size = sum(len(p) for p in payload)
        seq, step, index = (min(v, MAX_FIELD) for v in position)
        self._send_all([memoryview(HEADER.pack(MAGIC, op, WIRE_CODES[wire], seq, step, index,
                                               size)), *payload])
        self.bytes_sent += HEADER.size + size
        return HEADER.size + size

    def _send_all(self, parts: list[memoryview]) -> None:
        try:
            while parts:
                sent = self.sock.sendmsg(parts)
                parts = _advance(parts, sent)
        except OSError as exc:
            raise DataLinkError(f"the data link broke while sending ({exc})") from exc

    def receive(self, wire: str, shape: Sequence[int], deadline: float,
                current: tuple[int, int] | None = None) -> Received:
        """The next message, whose payload must be a ``[T, d]`` of ``wire`` (``shape``).

        The header and the payload are read together (one ``recvmsg_into`` in the usual case)
        into the header buffer and one of the reused payload buffers of the expected size.
        With ``current`` (the step's (seq, step)), a message of another step and another size
        (a partial of a step the master abandoned, left in the link) is read past and skipped.
        """
        layout = payload_layout(wire, shape)
        expected = _nbytes(layout)
        header = memoryview(self._header)
        while True:
            payload = self._payloads.take(expected)
            got = self._read_into([header, payload], deadline, stop_at=HEADER.size)
            magic, op, code, seq, step, index, size = HEADER.unpack(self._header)
            if (size == expected or current is None or (seq, step) == current
                    or not is_protocol(magic, op, code, wire)):
                break
            self._skip(size, payload[:got - HEADER.size], deadline)
        check_header((magic, op, code, size), (MAGIC, wire, expected), shape)
        if got < HEADER.size + size:
            self._read_into([payload[got - HEADER.size:]], deadline)
        self.bytes_received += HEADER.size + size
        return Received(op, seq, step, index, _tensors(payload, layout), HEADER.size + size)

    def _skip(self, size: int, read: memoryview, deadline: float) -> None:
        """Pass over a stale message of ``size`` payload bytes, of which ``read`` came with its
        header: keep what was read past its end (the next message's start), drain the rest."""
        if size > MAX_SKIPPED_BYTES:
            raise DataLinkError(f"a message of {size} bytes announced: not the data-link "
                                "protocol")
        self.bytes_received += HEADER.size + size
        if len(read) >= size:
            self._carry[:0] = read[size:]
            return
        left = size - len(read)
        scratch = memoryview(bytearray(min(left, 1 << 20)))
        while left:
            chunk = min(left, len(scratch))
            self._read_into([scratch[:chunk]], deadline)
            left -= chunk

    @property
    def holds_bytes(self) -> bool:
        """Whether bytes of the next message were read already (past a skipped one)."""
        return bool(self._carry)

    @property
    def buffered_bytes(self) -> int:
        """Bytes this end holds for the messages it receives."""
        return self._payloads.nbytes

    def _read_into(self, views: list[memoryview], deadline: float, stop_at: int = 0) -> int:
        """Fill ``views`` in order, or only their first ``stop_at`` bytes (more may come in the
        same read); returns the bytes read. Reads without blocking and waits with poll(2)."""
        total = sum(len(v) for v in views)
        want, got = (stop_at or total), 0
        if self._carry:  # bytes read past a skipped message come first
            got = min(len(self._carry), total)
            _fill(views, self._carry[:got])
            del self._carry[:got]
            views = _advance(views, got)
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


MAX_SKIPPED_BYTES = 256 << 20  # a stale message larger than this is not one


def fits_native_exchange(x: torch.Tensor) -> bool:
    """Whether ``x`` is a partial :meth:`DataLink.exchange` sends: float32, contiguous, at
    most :data:`EXCHANGE_MAX_BYTES`."""
    return (x.dtype == torch.float32 and x.is_contiguous()
            and x.numel() * 4 <= EXCHANGE_MAX_BYTES)


def message_bytes(x: torch.Tensor) -> int:
    """The bytes on the wire of a float32 message carrying ``x``, header included."""
    return HEADER.size + x.numel() * 4


def first_readable(links: Sequence[DataLink], spin_s: float) -> int | None:
    """The index of the first of ``links`` with bytes to read within ``spin_s``, watched
    without sleeping (the native wait, GIL released; bytes a link already holds count); None
    when none had any by then, or when there is no native library: the caller then blocks in
    its poller, which also watches ZeroMQ. An allreduce's wait is usually shorter than a sleep
    and a wake-up, which is why it spins first (``EDGETP_SPIN_US``)."""
    for index, link in enumerate(links):
        if link.holds_bytes:
            return index
    if spin_s <= 0 or not 0 < len(links) <= native.WAIT_MAX_FDS or not native.available():
        return None  # (a star of more workers than one wait watches: the poller at once)
    return native.wait_readable([link.fileno() for link in links], spin_s)


def is_protocol(magic: bytes, op: int, code: int, wire: str) -> bool:
    """Whether a header is the data link's (a partial or a sum in the link's wire format)."""
    return magic == MAGIC and op in (OP_PARTIAL, OP_SUM) and code == WIRE_CODES[wire]


def _fill(views: list[memoryview], data: bytes | bytearray) -> None:
    """Copy ``data`` into the start of ``views``, in order."""
    offset = 0
    for view in views:
        n = min(len(view), len(data) - offset)
        view[:n] = data[offset:offset + n]
        offset += n
        if offset == len(data):
            return


def check_header(got: tuple[bytes, int, int, int], expected: tuple[bytes, str, int],
                 shape: Sequence[int]) -> None:
    """DataLinkError unless a header's (magic, op, wire code, payload bytes) are those of a
    message of ``expected`` (magic, wire format, payload bytes) carrying ``shape``."""
    magic, op, code, size = got
    want_magic, wire, want_size = expected
    if magic != want_magic or op not in (OP_PARTIAL, OP_SUM) or code != WIRE_CODES[wire]:
        raise DataLinkError(f"a message that is not the data-link protocol (magic {magic!r}, "
                            f"op {op}, wire {code})")
    if size != want_size:
        raise DataLinkError(f"a payload of {size} bytes where {list(shape)} in {wire} "
                            f"takes {want_size}")


def _advance(parts: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of ``parts`` after ``sent`` bytes went out."""
    while parts and sent >= len(parts[0]):
        sent -= len(parts[0])
        parts = parts[1:]
    if parts and sent:
        parts = [parts[0][sent:], *parts[1:]]
    return parts


def _tensors(buffer: memoryview, layout: list[tuple[torch.dtype, tuple[int, ...]]]
             ) -> list[torch.Tensor]:
    out, offset = [], 0
    for dtype, shape in layout:
        size = _nbytes([(dtype, shape)])
        raw = buffer[offset:offset + size]
        if dtype == torch.bfloat16:
            tensor = torch.frombuffer(raw, dtype=torch.int16).view(torch.bfloat16)
        else:
            tensor = torch.frombuffer(raw, dtype=dtype)
        out.append(tensor.view(shape))
        offset += size
    return out


# -- joining -------------------------------------------------------------------------------------

class DataListener:
    """The worker's side of joining: a listening socket and the token the master must show.

    ``host`` is the address the worker reaches the master from (its interface on the
    cluster's network); ``port`` 0 takes an ephemeral port.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a fixed port
            self.sock.bind((host, port))  # is bound again at every join
            self.sock.listen(LISTEN_BACKLOG)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.host, self.port = self.sock.getsockname()[:2]
        self.token = secrets.token_hex(TOKEN_BYTES)

    def accept(self, timeout_s: float = JOIN_TIMEOUT_S) -> DataLink:
        """The master's connection: the first one showing our token; DataLinkError if none
        comes within ``timeout_s``. Every other connection is closed."""
        deadline = time.monotonic() + timeout_s
        arrivals = _Arrivals(MAGIC + self.token.encode())
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            try:
                while (remaining := deadline - time.monotonic()) > 0:
                    for key, _ in selector.select(min(remaining, TOKEN_DEADLINE_S / 4)):
                        if key.data is None:  # the listener
                            arrivals.admit(self.sock, selector)
                        elif (conn := arrivals.read(key.data, selector)) is not None:
                            return DataLink(conn)
                    arrivals.drop_late(selector)
            finally:
                arrivals.close_all()
        raise DataLinkError("the master did not open the data link")

    def close(self) -> None:
        self.sock.close()


class _Arrivals:
    """Connections accepted while joining, each until it shows the expected bytes (it is then
    the link), shows other bytes, or stays silent past :data:`TOKEN_DEADLINE_S` (closed)."""

    def __init__(self, expected: bytes) -> None:
        self.expected = expected
        self.shown: dict[socket.socket, bytes] = {}  # in arrival order
        self.since: dict[socket.socket, float] = {}

    def admit(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        """Accept every connection waiting on ``listener``."""
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of file descriptors: the backlog keeps the rest
                return
            conn.setblocking(False)
            if len(self.shown) >= PENDING_MAX:
                self.drop(next(iter(self.shown)), selector)
            self.shown[conn], self.since[conn] = b"", time.monotonic()
            selector.register(conn, selectors.EVENT_READ, conn)

    def read(self, conn: socket.socket, selector: selectors.BaseSelector) -> socket.socket | None:
        """Read what ``conn`` shows; the connection itself once it showed the token."""
        try:
            chunk = conn.recv(len(self.expected) - len(self.shown[conn]))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            chunk = b""
        shown = self.shown[conn] + chunk
        if not chunk or not self.expected.startswith(shown):
            self.drop(conn, selector)
            return None
        if shown != self.expected:
            self.shown[conn] = shown
            return None
        selector.unregister(conn)
        del self.shown[conn], self.since[conn]
        return conn

    def drop_late(self, selector: selectors.BaseSelector) -> None:
        limit = time.monotonic() - TOKEN_DEADLINE_S
        for conn in [c for c, since in self.since.items() if since < limit]:
            self.drop(conn, selector)

    def drop(self, conn: socket.socket, selector: selectors.BaseSelector) -> None:
        selector.unregister(conn)
        del self.shown[conn], self.since[conn]
        conn.close()

    def close_all(self) -> None:
        for conn in list(self.shown):
            conn.close()
        self.shown.clear()
        self.since.clear()


def connect(host: str, port: int, token: str, timeout_s: float = JOIN_TIMEOUT_S) -> DataLink:
    """The master's side of joining: connect to a worker's listener and show its token."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
        sock.sendall(MAGIC + token.encode())
    except OSError as exc:
        raise DataLinkError(f"cannot open a data link to {host}:{port} ({exc})") from exc
    return DataLink(sock)
