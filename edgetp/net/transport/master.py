"""The master's side of the transport: a ZeroMQ ROUTER that workers join and leave.

:class:`MasterTransport` binds, admits workers through the handshake
(:mod:`~edgetp.net.transport.handshake`), opens their data links (sealed with keys of their
own when the cluster has keys: edgetp.net.linkkeys), sends steps and sums, hands
data messages (partials, stats, errors) to the request, answers pings, notes each worker's
``health`` (why its weights fail to read, if they do), and forgets workers that fall silent.
It knows nothing of models. Every receive has a deadline; a peer that sends garbage is logged
and its message dropped.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from edgetp.core import settings
from edgetp.net import datalink, wire
from edgetp.net.datalink import DataLink, DataLinkError
from edgetp.net.delay import LinkDelay  # EDGETP_LINK_DELAY_MS: send-side delay (testbeds)
from edgetp.net.linkkeys import LinkCipher, LinkKeyError, master_link_keys
from edgetp.net.sealedlink import SealedDataLink
from edgetp.net.security import (
    MasterSecurity,
    authorize,
    client_key,
    make_server,
    warn_if_insecure,
)
from edgetp.net.transport.errors import ClusterError
from edgetp.net.transport.handshake import HEARTBEAT_S, NodeIdentity, refusal
from edgetp.net.transport.sockets import configure_socket, make_context, peer_ip, receive_frames
from edgetp.net.transport.traffic import Traffic
from edgetp.net.wire import Message, WireError

log = logging.getLogger(__name__)

SERVICE_INTERVAL_S = 0.005  # how often an idle master answers control messages
BUSY_INTERVAL_S = 0.05  # ... and looks again while a request runs (less GIL contention)


@dataclass
class Peer:
    """A joined worker as the master knows it."""

    rank: int
    identity: bytes
    host: str
    pid: int
    last_seen: float
    clock_offset_s: float  # master clock minus worker clock (estimated at handshake)
    public_key: str = ""  # its CURVE public key (z85) as ZAP verified it ("": no keys)
    ring_token: str = ""  # what its ring listener admits without keys (ring allreduce only)
    ring_address: str = ""  # where its ring PULL socket listens (ring allreduce only)
    weights_failure: str = ""  # why its weights fail to read, from its last "health" ("": fine)
    kv_slots: int = 1  # the sequences it can hold at once (its hello)


class MasterTransport:
    """The master's ROUTER socket and its view of the workers.

    Thread use: the socket is guarded by :attr:`lock`. The request thread holds it for the
    whole request and services control messages while it waits; a heartbeat thread services
    them in between requests.
    """

    def __init__(self, bind: str, expected: NodeIdentity, n_ranks: int, wire_dtype: str = "f32",
                 timeout_s: float = 10.0, security: MasterSecurity | None = None) -> None:
        self.expected = expected
        self.n_ranks = n_ranks
        self.wire_dtype = wire_dtype
        self.timeout_s = timeout_s
        self.link_delay = LinkDelay.from_env()  # link emulation hook, off unless set
        self.spin_s = settings.spin_seconds()  # an allreduce's watch before it sleeps
        self.session = uuid.uuid4().hex
        self.allreduce = "star"  # or "ring": announced to workers in the welcome
        self.ring_port = 0
        self.members: frozenset[bytes] = frozenset()  # with keys: the cluster's public keys
        self.peers: dict[int, Peer] = {}
        self.data_links: dict[int, DataLink] = {}  # the allreduce's TCP links (edgetp.net.datalink)
        self.use_data_links = datalink.enabled()  # with keys: sealed (edgetp.net.sealedlink)
        self.security = security
        self.traffic = Traffic()
        self.lock = threading.RLock()
        self.sock = make_context().socket(zmq.ROUTER)
        configure_socket(self.sock)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if security is not None:
            workers = authorize(self.sock, security.authorized_dir)
            self.members = workers | {security.keys.public}
            make_server(self.sock, security.keys)
        warn_if_insecure(bind, security is not None)
        self.sock.bind(bind)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self.data_poller = self._poller  # the socket and every data link (see _relink)
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                           name="edgetp-master-heartbeat")
        self._heartbeat.start()

    # -- membership -------------------------------------------------------------------------

    @property
    def worker_ranks(self) -> range:
        return range(1, self.n_ranks)

    def missing_ranks(self) -> list[int]:
        """Worker ranks not joined (with the ring: or whose ring listener is not announced)."""
        peers = dict(self.peers)  # the heartbeat thread may change it
        return [r for r in self.worker_ranks if r not in peers
                or (self.allreduce == "ring" and not peers[r].ring_address)]

    def wait_for_workers(self, timeout_s: float | None = None) -> None:
        """Block until every worker rank has joined, or raise naming the missing ones."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        with self.lock:
            while self.missing_ranks():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ClusterError(
                        f"worker rank(s) {self.missing_ranks()} have not joined the master at "
                        f"{self.address}; start them with `edgetp worker --shard DIR/rank-K "
                        f"--master tcp://HOST:PORT` and check the network"
                    )
                self._service(min(remaining, 0.1))

    def describe(self, rank: int) -> str:
        peer = self.peers.get(rank)
        return f"rank {rank}" + (f" ({peer.host}, pid {peer.pid})" if peer else "")

    # -- sending ----------------------------------------------------------------------------

    def send(self, rank: int, op: str, fields: dict[str, Any],
             tensors: Sequence[torch.Tensor] = ()) -> None:
        peer = self.peers.get(rank)
        if peer is None:
            raise ClusterError(f"{self.describe(rank)} is not connected")
        self.link_delay.before_send(op)  # link emulation: one traversal (edgetp.net.delay)
        self._send_to(peer.identity, op, fields, tensors, rank)

    def broadcast(self, op: str, fields: dict[str, Any],
                  tensors: Sequence[torch.Tensor] = ()) -> None:
        frames = wire.encode(op, fields, tensors)
        self.link_delay.before_send(op)  # link emulation: once (the links are parallel)
        for rank in self.worker_ranks:
            peer = self.peers.get(rank)
            if peer is None:
                raise ClusterError(f"{self.describe(rank)} left the cluster")
            self._send_frames(peer.identity, op, frames, rank)

    def send_sum(self, fields: dict[str, Any], frames: Sequence[torch.Tensor],
                 wire_dtype: str | None = None) -> int:
        """An allreduce's sum to every worker, in ``wire_dtype`` (default: the cluster's
        wire): over its data link if it has one, else ZeroMQ. Returns the bytes sent."""
        self.link_delay.before_send("sum")  # one traversal: the links are parallel
        encoded: list[Any] | None = None
        nbytes = 0
        position = (fields["seq"], fields["step"], fields["index"])
        for rank in self.worker_ranks:
            link = self.data_links.get(rank)
            if link is not None:
                try:
                    sent = link.send(datalink.OP_SUM, wire_dtype or self.wire_dtype, position,
                                     frames)
                except DataLinkError as exc:
                    self.drop_data_link(rank)
                    raise ClusterError(f"{self.describe(rank)}: {exc}") from exc
                self.traffic.count_link("sum", sent, sent=True)
                nbytes += sent
                continue
            peer = self.peers.get(rank)
            if peer is None:
                raise ClusterError(f"{self.describe(rank)} left the cluster")
            encoded = encoded or wire.encode("sum", fields, frames)
            self._send_frames(peer.identity, "sum", encoded, rank)
            nbytes += sum(len(memoryview(f)) for f in encoded)
        return nbytes

    def send_own_partial(self, rank: int, fields: dict[str, Any],
                         frames: Sequence[torch.Tensor], wire_dtype: str | None = None) -> int:
        """The master's own partial to worker ``rank`` over its data link, in ``wire_dtype``
        (default: the cluster's wire; a two-rank exchange: the worker sums the two partials
        itself); the bytes sent."""
        self.link_delay.before_send("partial")
        link = self.data_links[rank]
        try:
            sent = link.send(datalink.OP_PARTIAL, wire_dtype or self.wire_dtype,
                             (fields["seq"], fields["step"], fields["index"]), frames)
        except DataLinkError as exc:
            self.drop_data_link(rank)
            raise ClusterError(f"{self.describe(rank)}: {exc}") from exc
        self.traffic.count_link("partial", sent, sent=True)
        return sent

    def exchanges_natively(self, rank: int, x: torch.Tensor, wire_dtype: str) -> bool:
        """Whether worker ``rank``'s two-rank exchange of ``x`` can take the native path
        (:meth:`exchange`): a float32 wire, a plain data link, a decode-sized float32 partial,
        no emulated link delay."""
        link = self.data_links.get(rank)
        return (link is not None and link.exchanges_natively and wire_dtype == "f32"
                and datalink.fits_native_exchange(x) and not self.link_delay.active)

    def exchange(self, rank: int, fields: dict[str, Any], x: torch.Tensor
                 ) -> torch.Tensor | None:
        """Send this allreduce's own partial ``x`` to worker ``rank`` and, if the worker's
        comes within the spin, return the two's sum (see :meth:`DataLink.exchange`); None
        when it did not: the caller gathers it as usual."""
        link = self.data_links[rank]
        try:
            total = link.exchange((fields["seq"], fields["step"], fields["index"]), x,
                                  self.spin_s)
        except DataLinkError as exc:
            self.drop_data_link(rank)
            raise ClusterError(f"{self.describe(rank)}: {exc}; the request was abandoned (the "
                               "worker rejoins)") from exc
        size = datalink.message_bytes(x)
        self.traffic.count_link("partial", size, sent=True)
        if total is not None:
            self.heard_from(rank)
            self.traffic.count_link("partial", size, sent=False)
        return total

    def heard_from(self, rank: int) -> None:
        peer = self.peers.get(rank)
        if peer is not None:
            peer.last_seen = time.monotonic()

    def drop_data_link(self, rank: int) -> None:
        link = self.data_links.pop(rank, None)
        if link is not None:
            link.close()
            self._relink()

    def _relink(self) -> None:
        """Rebuild the poller of gathers: the socket and every data link."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        for link in self.data_links.values():
            poller.register(link.fileno(), zmq.POLLIN)
        self.data_poller = poller

    def _send_to(self, identity: bytes, op: str, fields: dict[str, Any],
                 tensors: Sequence[torch.Tensor] = (), rank: int | None = None) -> None:
        self._send_frames(identity, op, wire.encode(op, fields, tensors), rank)

    def _send_frames(self, identity: bytes, op: str, frames: list[Any], rank: int | None) -> None:
        try:
            self.sock.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError as exc:
            if rank is not None and self.peers.get(rank) and self.peers[rank].identity == identity:
                del self.peers[rank]
            raise ClusterError(f"cannot reach {self.describe(rank) if rank else 'peer'}: "
                               f"{exc}; the worker has disconnected") from exc
        self.traffic.count_sent(op, frames)

    # -- receiving --------------------------------------------------------------------------

    def receive(self, timeout_s: float) -> tuple[int, Message] | None:
        """The next data message (partial, stats, error) from a joined worker, or None.

        Control messages (hello, ping) are handled here; malformed ones are dropped.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            frames = receive_frames(self.sock, self._poller, deadline - time.monotonic())
            if frames is None:
                return None
            got = self._receive_one(frames)
            if got is not None:
                return got

    def _receive_one(self, frames: list[Any]) -> tuple[int, Message] | None:
        identity = bytes(frames[0])
        try:
            message = wire.decode(frames[1:])
        except WireError as exc:
            self.traffic.dropped += 1
            log.warning("dropped a malformed message from %s: %s", self._who(identity), exc)
            return None
        self.traffic.count_received(message.op, frames[1:])
        rank = self._rank_of(identity)
        if message.op == "hello":
            self._handle_hello(identity, message, peer_ip(frames[1]), client_key(frames[1]))
            return None
        if rank is None:
            self._reply(identity, "rejoin", {})
            return None
        self.peers[rank].last_seen = time.monotonic()
        if message.op == "ring_open":
            self._note_ring(rank, message.fields, peer_ip(frames[1]))
            return None
        if message.op == "ping":
            self._send_to(identity, "pong", {"time": time.time(), "echo": message.fields["time"]},
                          rank=rank)
            return None
        if message.op == "health":
            self._note_health(rank, message.fields["weights"])
            return None
        if message.op in ("partial", "stats", "error"):
            return rank, message
        self.traffic.dropped += 1
        log.warning("dropped an unexpected %r message from %s", message.op, self.describe(rank))
        return None

    def _reply(self, identity: bytes, op: str, fields: dict[str, Any],
               rank: int | None = None) -> None:
        """Answer a peer that is not (yet) a worker of the request; it may be gone already.

        Its failure must not fail the request that happens to be receiving (ZeroMQ drops the
        route of a vanished peer, and ROUTER_MANDATORY makes the send raise).
        """
        try:
            self._send_to(identity, op, fields, rank=rank)
        except ClusterError as exc:
            log.info("could not answer %s with %r: %s", self._who(identity), op, exc)

    def _note_health(self, rank: int, weights_failure: str) -> None:
        peer = self.peers[rank]
        if weights_failure and weights_failure != peer.weights_failure:
            log.error("%s cannot read its weights: %s", self.describe(rank), weights_failure)
        elif peer.weights_failure and not weights_failure:
            log.info("%s reads its weights again", self.describe(rank))
        peer.weights_failure = weights_failure

    def failing_ranks(self) -> dict[int, str]:
        """Joined workers whose weights fail to read, with the reason each reported."""
        return {rank: peer.weights_failure for rank, peer in list(self.peers.items())
                if peer.weights_failure}

    def _rank_of(self, identity: bytes) -> int | None:
        for rank, peer in self.peers.items():
            if peer.identity == identity:
                return rank
        return None

    def _who(self, identity: bytes) -> str:
        rank = self._rank_of(identity)
        return self.describe(rank) if rank is not None else f"unknown peer {identity.hex()[:8]}"

    def _note_ring(self, rank: int, fields: dict[str, Any], peer_ip: str) -> None:
        """A worker's ring listener (it opens one only when the welcome chose the ring)."""
        if self.allreduce != "ring" or not 0 < fields["port"] < 65536:
            log.warning("%s announced a ring listener this master does not use",
                        self.describe(rank))
            return
        peer = self.peers[rank]
        peer.ring_address, peer.ring_token = f"tcp://{peer_ip}:{fields['port']}", fields["token"]

    def _handle_hello(self, identity: bytes, message: Message, peer_ip: str,
                      public_key: str = "") -> None:
        fields = message.fields
        reason = refusal(self.expected, self.n_ranks, fields)
        if reason:
            log.warning("refused worker %s (rank %s): %s", fields["host"], fields["rank"], reason)
            self._reply(identity, "refuse", {"reason": reason})
            return
        rank = fields["rank"]
        self.peers[rank] = Peer(rank, identity, fields["host"], fields["pid"], time.monotonic(),
                                time.time() - fields["time"], public_key=public_key,
                                kv_slots=fields["kv_slots"])
        data = self._open_data_link(rank, peer_ip, fields, public_key)
        log.info("worker rank %d joined from %s (pid %d)%s", rank, fields["host"], fields["pid"],
                 "" if data["data"] else "; allreduce over ZeroMQ")
        self._reply(identity, "welcome", {"session": self.session,
                                          "wire_dtype": self.wire_dtype, "time": time.time(),
                                          "allreduce": self.allreduce,
                                          "ring_port": self.ring_port,
                                          "ring_keys": self._ring_keys(), **data},
                    rank=rank)

    def _ring_keys(self) -> str:
        """The keys a worker's ring listener admits (with the ring and keys), space-separated."""
        if self.allreduce != "ring":
            return ""
        return " ".join(sorted(key.decode() for key in self.members))

    def _open_data_link(self, rank: int, peer_ip: str, hello: dict[str, Any],
                        worker_key: str) -> dict[str, Any]:
        """Connect to the worker's data listener (replacing an older link), sealed with keys
        agreed from its hello when the cluster has keys; the welcome's data-link fields."""
        self.drop_data_link(rank)
        off: dict[str, Any] = {"data": False, "data_key": "", "data_cipher": ""}
        if not (hello["data_port"] and self.use_data_links and self.allreduce == "star"):
            return off
        try:
            keys, sealing = (None, {}) if self.security is None else master_link_keys(
                hello, self.security.keys.public.decode(), worker_key, self.session)
            link = datalink.connect(peer_ip, hello["data_port"], hello["data_token"])
        except (DataLinkError, LinkKeyError) as exc:
            log.warning("rank %d: %s; its allreduce goes over ZeroMQ", rank, exc)
            return off
        if keys is not None:
            link = SealedDataLink.over(link, LinkCipher(keys, True, self.describe(rank)))
        self.data_links[rank] = link
        self._relink()
        return {**off, **sealing, "data": True}

    def _service(self, timeout_s: float) -> None:
        """Handle control messages for up to ``timeout_s``; data messages now are stale."""
        got = self.receive(timeout_s)
        if got is not None:
            rank, message = got
            if message.op == "error":
                log.error("%s reported: %s", self.describe(rank), message.fields["message"])

    def _heartbeat_loop(self) -> None:
        if hasattr(signal, "pthread_sigmask"):  # Ctrl-C goes to the main thread, not here
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        interval = SERVICE_INTERVAL_S
        while not self._stop.wait(interval):
            interval = BUSY_INTERVAL_S  # a request holds the lock: it serves the socket itself
            if self.lock.acquire(blocking=False):
                interval = SERVICE_INTERVAL_S
                try:
                    if not self._stop.is_set():
                        self._service(0)
                        self._forget_silent_peers()
                except (zmq.ZMQError, ClusterError) as exc:
                    log.debug("heartbeat: %s", exc)
                finally:
                    self.lock.release()

    def _forget_silent_peers(self) -> None:
        limit = time.monotonic() - max(self.timeout_s, 4 * HEARTBEAT_S)
        for rank, peer in list(self.peers.items()):
            if peer.last_seen < limit:
                log.warning("%s has been silent for %.0f s; dropping it",
                            self.describe(rank), time.monotonic() - peer.last_seen)
                del self.peers[rank]
                self.drop_data_link(rank)

    def close(self, shutdown_workers: bool = False) -> None:
        self._stop.set()
        with self.lock:
            if shutdown_workers:
                for rank in list(self.peers):
                    try:
                        self.send(rank, "shutdown", {})
                    except ClusterError:
                        pass
            for rank in list(self.data_links):
                self.drop_data_link(rank)
            self.sock.close(linger=0)
        self._heartbeat.join(timeout=2)
