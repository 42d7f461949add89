"""The worker's side of the transport: a ZeroMQ DEALER that joins the master and stays joined.

:class:`WorkerTransport` says hello (:mod:`~edgetp.net.transport.handshake`), accepts the
master's data link if the welcome offers one (sealed with the keys the hello and the welcome
agreed when the cluster has keys: edgetp.net.linkkeys), syncs its clock, pings while idle,
and hands the compute loop the messages meant for it (step, sum, abort, shutdown, collect,
link). When the master falls silent or forgets it, it raises
:class:`~edgetp.net.transport.errors.ClusterError` and the caller connects again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch
import zmq

from edgetp.core import settings
from edgetp.net import datalink, wire
from edgetp.net.codec import payload_bytes
from edgetp.net.datalink import DataLink, DataLinkError, DataListener
from edgetp.net.delay import LinkDelay  # EDGETP_LINK_DELAY_MS: send-side delay (testbeds)
from edgetp.net.linkkeys import (
    KeyOffer,
    LinkCipher,
    LinkKeyError,
    preferred_ciphers,
    worker_link_keys,
)
from edgetp.net.sealedlink import SealedDataLink
from edgetp.net.security import WorkerSecurity, make_client
from edgetp.net.transport.errors import ClusterError, HandshakeRefused
from edgetp.net.transport.handshake import (
    CLOCK_SYNC_PINGS,
    HEARTBEAT_S,
    ClockEstimate,
    NodeIdentity,
)
from edgetp.net.transport.sockets import (
    configure_socket,
    local_address_towards,
    make_context,
    receive_frames,
)
from edgetp.net.transport.traffic import Traffic
from edgetp.net.wire import Message, WireError

log = logging.getLogger(__name__)


class WorkerTransport:
    """A worker's DEALER socket: handshake, heartbeats and reconnection to the master."""

    def __init__(self, master: str, identity: NodeIdentity, timeout_s: float = 10.0,
                 frame_log: Callable[[list[bytes]], None] | None = None,
                 security: WorkerSecurity | None = None, data_port: int = 0) -> None:
        self.master = master
        self.data_port = data_port  # where the data link listens (0: an ephemeral port)
        self.security = security
        self.identity = identity
        self.timeout_s = timeout_s
        self.link_delay = LinkDelay.from_env()  # link emulation hook, off unless set
        self.spin_s = settings.spin_seconds()  # an allreduce's watch before it sleeps
        self.frame_log = frame_log
        self.traffic = Traffic()
        self.wire_dtype = "f32"
        self.session = ""  # the master's session id, from its welcome
        self.clock = ClockEstimate()  # the master's clock, from the handshake and the pongs
        self.sock: zmq.Socket | None = None
        self.allreduce = "star"  # or "ring", as the master's welcome says
        self.master_ring_port = 0
        self.ring_keys = ""
        self._pending: list[Message] = []  # arrived during the clock sync, not yet served
        self.last_heard = 0.0
        self.last_sent = 0.0
        self.data_link: DataLink | None = None  # the allreduce's TCP link (edgetp.net.datalink)
        self.data_poller: zmq.Poller | None = None  # the socket and the data link
        if data_port:
            self._check_data_port()

    def connect(self, give_up_s: float | None = None) -> None:
        """(Re)connect and complete the handshake; retries until ``give_up_s`` (None: forever)."""
        deadline = None if give_up_s is None else time.monotonic() + give_up_s
        self._new_socket()
        while True:
            sent_at = time.time()
            message = self._say_hello()
            if message is not None:
                if message.op == "refuse":
                    raise HandshakeRefused(f"master refused rank {self.identity.rank}: "
                                           f"{message.fields['reason']}")
                self._accept_welcome(message.fields, sent_at)
                return
            if deadline is not None and time.monotonic() > deadline:
                raise ClusterError(f"no answer from the master at {self.master}")
            self._new_socket()  # a fresh connection (the master may have restarted)

    @property
    def clock_offset_s(self) -> float:
        """The master's clock minus ours (seconds), as estimated so far."""
        return self.clock.offset_s

    def _say_hello(self) -> Message | None:
        """One hello; the master's welcome (its data link joined) or refusal, or None."""
        listener = self._data_listener()
        offer = KeyOffer() if listener is not None and self.security is not None else None
        self.send("hello", self.identity.hello_fields(
            listener.port if listener else 0, listener.token if listener else "",
            offer.public_hex if offer else "", " ".join(preferred_ciphers()) if offer else ""))
        message = self._wait_for_handshake_reply()
        if message is not None and message.op == "welcome" and not self._join_data_link(
                listener, message.fields, offer):
            message = None  # the master's link did not arrive: say hello again
        if listener is not None:
            listener.close()
        return message

    def _accept_welcome(self, fields: dict[str, Any], sent_at: float) -> None:
        """Take the master's settings from its welcome and sync our clock to its."""
        self.wire_dtype = fields["wire_dtype"]
        self.session = fields["session"]
        self.allreduce = fields["allreduce"]
        self.master_ring_port = fields["ring_port"]
        self.ring_keys = fields["ring_keys"]  # what our ring listener admits (with keys)
        self.clock.sample(fields["time"], sent_at)
        self._sync_clock()
        log.info("rank %d joined master %s (clock offset %.2f ms, rtt %.2f ms)",
                 self.identity.rank, self.master, self.clock.offset_s * 1e3,
                 self.clock.best_rtt_s * 1e3)

    def _data_listener(self) -> DataListener | None:
        """Where the master may open the data link (None: the allreduce stays on ZeroMQ): on
        the interface we reach the master from, at ``data_port`` if one is fixed."""
        if not datalink.enabled():
            return None
        try:
            return DataListener(local_address_towards(self.master), self.data_port)
        except OSError as exc:
            log.warning("no data link (cannot listen on %s: %s); the allreduce goes over ZeroMQ",
                        f"port {self.data_port}" if self.data_port else "an ephemeral port", exc)
            return None

    def _check_data_port(self) -> None:
        """A fixed data port that cannot be listened on is an error now, with the fix."""
        if not datalink.enabled():
            log.info("--data-port %d is not used: the data link is off (%s=0)", self.data_port,
                     datalink.ENV_SWITCH)
            return
        try:
            host = local_address_towards(self.master)
        except OSError:
            return  # the master's host does not resolve yet: each join tries again
        try:
            DataListener(host, self.data_port).close()
        except OSError as exc:
            raise DataLinkError(f"--data-port {self.data_port}: cannot listen on "
                                f"{host}:{self.data_port} ({exc.strerror or exc}); choose a free "
                                "port, or leave --data-port out for an ephemeral one") from exc

    def _join_data_link(self, listener: DataListener | None, welcome: dict[str, Any],
                        offer: KeyOffer | None) -> bool:
        """Accept the master's data link if its welcome offers one, sealed with the keys
        agreed from ``offer`` when we have keys; False if it never came (or is unfit)."""
        self._close_data_link()
        offered = welcome["data"]
        if not offered or listener is None:
            return not offered
        try:
            keys = None
            if self.security is not None:
                if offer is None:
                    raise LinkKeyError("no key was offered for the data link")
                keys = worker_link_keys(offer, welcome, self.security.master_public.decode(),
                                        self.security.keys.public.decode(), listener.token)
            link = listener.accept()
        except (DataLinkError, LinkKeyError) as exc:
            log.warning("rank %d: %s; joining again", self.identity.rank, exc)
            return False
        if keys is not None:
            link = SealedDataLink.over(link, LinkCipher(keys, False, f"the master at "
                                                                     f"{self.master}"))
        self.data_link = link
        assert self.sock is not None
        self.data_poller = zmq.Poller()
        self.data_poller.register(self.sock, zmq.POLLIN)
        self.data_poller.register(self.data_link.fileno(), zmq.POLLIN)
        return True

    def _close_data_link(self) -> None:
        if self.data_link is not None:
            self.data_link.close()
        self.data_link, self.data_poller = None, None

    def send_partial(self, fields: dict[str, Any], frames: Sequence[torch.Tensor],
                     wire_dtype: str | None = None) -> int:
        """An allreduce's partial to the master, in ``wire_dtype`` (default: the cluster's
        wire), over the data link if there is one; bytes."""
        if self.data_link is None:
            self.send("partial", fields, frames)
            return payload_bytes(frames)
        self.link_delay.before_send("partial")
        try:
            sent = self.data_link.send(datalink.OP_PARTIAL, wire_dtype or self.wire_dtype,
                                       (fields["seq"], fields["step"], fields["index"]), frames)
        except DataLinkError as exc:
            raise ClusterError(str(exc)) from exc
        self.traffic.count_link("partial", sent, sent=True)
        return sent

    def exchanges_natively(self, x: torch.Tensor, wire_dtype: str) -> bool:
        """Whether this allreduce's two-rank exchange of ``x`` in ``wire_dtype`` (the format
        it travels in) can take the native path (:meth:`exchange`): a float32 wire, a plain
        data link, a decode-sized float32 partial, no emulated link delay, no frame capture."""
        link = self.data_link
        return (link is not None and link.exchanges_natively and wire_dtype == "f32"
                and datalink.fits_native_exchange(x) and not self.link_delay.active
                and self.frame_log is None)

    def exchange(self, fields: dict[str, Any], x: torch.Tensor) -> torch.Tensor | None:
        """Send this allreduce's partial ``x`` and, if the master's comes within the spin,
        return the two's sum (see :meth:`DataLink.exchange`); None when it did not: the
        caller waits for it as usual."""
        assert self.data_link is not None
        try:
            total = self.data_link.exchange((fields["seq"], fields["step"], fields["index"]),
                                            x, self.spin_s)
        except DataLinkError as exc:
            raise ClusterError(f"{exc}; rejoining the master") from exc
        size = datalink.message_bytes(x)
        self.traffic.count_link("partial", size, sent=True)
        if total is not None:
            self.last_heard = time.monotonic()
            self.traffic.count_link("sum", size, sent=False)
        return total

    def data_link_readable(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the data link or the socket; True if the link has data
        (the socket's messages are then read with :meth:`receive_now`)."""
        assert self.data_link is not None and self.data_poller is not None, "no data link"
        if datalink.first_readable([self.data_link], self.spin_s) is not None:
            return True
        ready = dict(self.data_poller.poll(max(1, int(timeout_s * 1000))))
        return self.data_link.fileno() in ready

    def receive_sum(self, wire_dtype: str, shape: Sequence[int], deadline: float,
                    current: tuple[int, int] | None = None) -> datalink.Received:
        """The next message on the data link (read within ``deadline``): a sum, or the master's
        partial in a two-rank exchange; with ``current`` (seq, step), one of another step and
        size (left by an abandoned step) is skipped."""
        assert self.data_link is not None
        try:
            got = self.data_link.receive(wire_dtype, shape, deadline, current)
        except DataLinkError as exc:
            raise ClusterError(f"{exc}; rejoining the master") from exc
        self.last_heard = time.monotonic()
        self.traffic.count_link("sum", got.nbytes, sent=False)
        if self.frame_log is not None:  # as the same sum over ZeroMQ (--capture-frames)
            fields = {"seq": got.seq, "step": got.step, "index": got.index}
            op = "partial" if got.op == datalink.OP_PARTIAL else "sum"
            self.frame_log([bytes(f) for f in wire.encode(op, fields, got.tensors)])
        return got

    def _sync_clock(self) -> None:
        for _ in range(CLOCK_SYNC_PINGS):
            self.send("ping", {"time": time.time()})
            deadline = time.monotonic() + 0.5
            while (remaining := deadline - time.monotonic()) > 0:
                message = self._poll_one(remaining)
                if message is None:
                    continue
                if message.op == "pong":
                    break
                self._pending.append(message)  # e.g. a step sent right after the welcome

    def _new_socket(self) -> None:
        self._close_data_link()
        if self.sock is not None:
            self.sock.close(linger=0)
        self._pending.clear()  # messages of the previous connection's session
        self.sock = make_context().socket(zmq.DEALER)
        configure_socket(self.sock)
        self.sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self.security is not None:
            make_client(self.sock, self.security.keys, self.security.master_public)
        self.sock.connect(self.master)
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)

    def _wait_for_handshake_reply(self) -> Message | None:
        deadline = time.monotonic() + 2 * HEARTBEAT_S
        while (remaining := deadline - time.monotonic()) > 0:
            message = self._poll_one(remaining)
            if message is not None and message.op in ("welcome", "refuse"):
                return message
        return None

    def send(self, op: str, fields: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> None:
        assert self.sock is not None, "connect() first"
        frames = wire.encode(op, fields, tensors)
        self.link_delay.before_send(op)  # link emulation: one traversal (edgetp.net.delay)
        self.sock.send_multipart(frames, copy=False)
        self.traffic.count_sent(op, frames)
        self.last_sent = time.monotonic()

    def receive(self, timeout_s: float) -> Message | None:
        """The next message for the compute loop (step, sum, abort, shutdown), or None.

        Pings the master while idle; raises :class:`ClusterError` when the master has been
        silent for longer than the timeout (the caller reconnects).
        """
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            if self._pending:  # served first: they came before any silence
                message: Message | None = self._pending.pop(0)
            else:
                if time.monotonic() - self.last_sent > HEARTBEAT_S:
                    self.send("ping", {"time": time.time()})
                if time.monotonic() - self.last_heard > max(self.timeout_s, 3 * HEARTBEAT_S):
                    raise ClusterError(f"the master at {self.master} stopped answering")
                message = self._poll_one(min(remaining, HEARTBEAT_S / 2))
            if message is None:
                continue
            if self._for_compute_loop(message):
                return message
        return None

    def receive_now(self) -> Message | None:
        """A message for the compute loop if one is queued (no waiting, no pings)."""
        message = self._pending.pop(0) if self._pending else self._poll_one(0)
        return message if message is not None and self._for_compute_loop(message) else None

    @staticmethod
    def _for_compute_loop(message: Message) -> bool:
        if message.op == "rejoin":
            raise ClusterError("the master does not know this worker (it restarted)")
        return message.op in ("step", "sum", "abort", "shutdown", "collect", "link")

    def _poll_one(self, timeout_s: float) -> Message | None:
        assert self.sock is not None
        frames = receive_frames(self.sock, self._poller, timeout_s)
        if frames is None:
            return None
        if self.frame_log is not None:
            self.frame_log([bytes(f.buffer) for f in frames])
        try:
            message = wire.decode(frames)
        except WireError as exc:
            self.traffic.dropped += 1
            log.warning("dropped a malformed message from the master: %s", exc)
            return None
        self.traffic.count_received(message.op, frames)
        self.last_heard = time.monotonic()
        if message.op == "pong":
            self.clock.sample(message.fields["time"], message.fields["echo"])
        return message

    def close(self) -> None:
        self._close_data_link()
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
