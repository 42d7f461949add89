"""ZeroMQ sockets between the master (ROUTER, binds) and the workers (DEALER, connect).

The transport knows nothing of models. It owns the handshake (protocol version, model
fingerprint, plan, rank, shard dtype), heartbeats, timeouts and message counters. Every
receive has a deadline; a peer that sends garbage is logged and its message dropped.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from edgetp.core.errors import ClusterError
from edgetp.net import datalink as dataplane
from edgetp.net import wire
from edgetp.net.codec import payload_bytes
from edgetp.net.datalink import DataLink, DataLinkError, DataListener
from edgetp.net.delay import LinkDelay  # EDGETP_LINK_DELAY_MS: send-side delay (testbeds)
from edgetp.net.security import (
    MasterSecurity,
    WorkerSecurity,
    authorize,
    make_client,
    make_server,
    warn_if_insecure,
)
from edgetp.net.wire import Message, WireError

log = logging.getLogger("edgetp.net.transport")

HEARTBEAT_S = 1.0
SERVICE_INTERVAL_S = 0.005  # how often an idle master answers control messages
BUSY_INTERVAL_S = 0.05  # ... and looks again while a request runs (less GIL contention)
CLOCK_SYNC_PINGS = 8


class HandshakeRefused(ClusterError):
    """The master refused this worker; the reason says what does not match."""


class StepAborted(RuntimeError):
    """The master abandoned the request this worker was computing."""


class ShutdownRequested(RuntimeError):
    """The master told this worker to exit."""


@dataclass(frozen=True)
class NodeIdentity:
    """What a worker proves about itself in the handshake."""

    rank: int
    fingerprint: str
    plan: str  # the plan's canonical JSON
    dtype: str

    def hello_fields(self, ring_port: int = 0, data_port: int = 0,
                     data_token: str = "") -> dict[str, Any]:
        from edgetp import __version__

        return {"rank": self.rank, "fingerprint": self.fingerprint, "plan": self.plan,
                "dtype": self.dtype, "pid": os.getpid(), "host": socket.gethostname(),
                "version": __version__, "time": time.time(), "ring_port": ring_port,
                "data_port": data_port, "data_token": data_token}


@dataclass
class Traffic:
    """Messages and bytes by op, each way."""

    sent: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0
    bytes_received: int = 0
    dropped: int = 0

    def count_sent(self, op: str, frames: Sequence[Any]) -> None:
        self.sent[op] += 1
        self.bytes_sent += sum(len(memoryview(f)) for f in frames)

    def count_received(self, op: str, frames: Sequence[Any]) -> None:
        self.received[op] += 1
        self.bytes_received += sum(len(f.buffer) if hasattr(f, "buffer") else len(f)
                                   for f in frames)

    def count_link(self, op: str, nbytes: int, sent: bool) -> None:
        """A message over a data link (edgetp.net.datalink)."""
        if sent:
            self.sent[op] += 1
            self.bytes_sent += nbytes
        else:
            self.received[op] += 1
            self.bytes_received += nbytes


def make_context() -> zmq.Context:
    return zmq.Context.instance()


MAX_MESSAGE_BYTES = 32 << 20  # a peer sending a bigger frame is disconnected by ZeroMQ
RECEIVE_QUEUE = 64  # messages queued per peer before ZeroMQ drops (bounds hostile floods)


def _configure(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 10)


@dataclass
class Peer:
    rank: int
    identity: bytes
    host: str
    pid: int
    last_seen: float
    clock_offset_s: float  # master clock minus worker clock (estimated at handshake)
    ring_address: str = ""  # where its ring PULL socket listens (ring allreduce only)


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
        self.session = uuid.uuid4().hex
        self.allreduce = "star"  # or "ring": announced to workers in the welcome
        self.ring_port = 0
        self.peers: dict[int, Peer] = {}
        self.data_links: dict[int, DataLink] = {}  # the allreduce's TCP links (edgetp.net.datalink)
        self.use_data_links = security is None and dataplane.enabled()  # no CURVE over them
        self.traffic = Traffic()
        self.lock = threading.RLock()
        self.sock = make_context().socket(zmq.ROUTER)
        _configure(self.sock)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if security is not None:
            authorize(self.sock, security.authorized_dir)
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
        return [r for r in self.worker_ranks if r not in self.peers]

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

    def send_sum(self, fields: dict[str, Any], frames: Sequence[torch.Tensor]) -> int:
        """An allreduce's sum to every worker: over its data link if it has one, else ZeroMQ.
        Returns the bytes sent."""
        self.link_delay.before_send("sum")  # one traversal: the links are parallel
        encoded: list[Any] | None = None
        nbytes = 0
        position = (fields["seq"], fields["step"], fields["index"])
        for rank in self.worker_ranks:
            link = self.data_links.get(rank)
            if link is not None:
                try:
                    sent = link.send(dataplane.OP_SUM, self.wire_dtype, position, frames)
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
            self._handle_hello(identity, message, _peer_ip(frames[1]))
            return None
        if rank is None:
            self._reply(identity, "rejoin", {})
            return None
        self.peers[rank].last_seen = time.monotonic()
        if message.op == "ping":
            self._send_to(identity, "pong", {"time": time.time(), "echo": message.fields["time"]},
                          rank=rank)
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

    def _rank_of(self, identity: bytes) -> int | None:
        for rank, peer in self.peers.items():
            if peer.identity == identity:
                return rank
        return None

    def _who(self, identity: bytes) -> str:
        rank = self._rank_of(identity)
        return self.describe(rank) if rank is not None else f"unknown peer {identity.hex()[:8]}"

    def _handle_hello(self, identity: bytes, message: Message, peer_ip: str) -> None:
        fields = message.fields
        reason = self._refusal(fields)
        if reason:
            log.warning("refused worker %s (rank %s): %s", fields["host"], fields["rank"], reason)
            self._reply(identity, "refuse", {"reason": reason})
            return
        rank = fields["rank"]
        ring = f"tcp://{peer_ip}:{fields['ring_port']}" if fields["ring_port"] else ""
        self.peers[rank] = Peer(rank, identity, fields["host"], fields["pid"], time.monotonic(),
                                time.time() - fields["time"], ring)
        data = self._open_data_link(rank, peer_ip, fields["data_port"], fields["data_token"])
        log.info("worker rank %d joined from %s (pid %d)%s", rank, fields["host"], fields["pid"],
                 "" if data else "; allreduce over ZeroMQ")
        self._reply(identity, "welcome", {"session": self.session,
                                          "wire_dtype": self.wire_dtype, "time": time.time(),
                                          "allreduce": self.allreduce,
                                          "ring_port": self.ring_port, "data": data}, rank=rank)

    def _open_data_link(self, rank: int, peer_ip: str, port: int, token: str) -> bool:
        """Connect to the worker's data listener (replacing an older link); False if none."""
        self.drop_data_link(rank)
        if not (port and self.use_data_links and self.allreduce == "star"):
            return False
        try:
            self.data_links[rank] = dataplane.connect(peer_ip, port, token)
        except DataLinkError as exc:
            log.warning("rank %d: %s; its allreduce goes over ZeroMQ", rank, exc)
            return False
        self._relink()
        return True

    def _refusal(self, fields: dict[str, Any]) -> str | None:
        expected = self.expected
        if fields["rank"] not in self.worker_ranks:
            return (f"rank {fields['rank']} is not a worker rank of this {self.n_ranks}-node "
                    f"cluster (expected 1..{self.n_ranks - 1})")
        if fields["fingerprint"] != expected.fingerprint:
            return ("the shard is of a different model than the master's (fingerprint "
                    f"{fields['fingerprint'][:12]} != {expected.fingerprint[:12]}); re-split")
        if fields["plan"] != expected.plan:
            return "the shard was split with a different plan (nodes, shares or private layers)"
        if fields["dtype"] != expected.dtype:
            return f"the shard is stored as {fields['dtype']}, the master's as {expected.dtype}"
        return None

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


def _peer_ip(frame: Any) -> str:
    """The sender's IP address as ZeroMQ saw it (for the ring), or loopback if unknown."""
    try:
        return str(frame.get("Peer-Address")) or "127.0.0.1"
    except (zmq.ZMQError, AttributeError):
        return "127.0.0.1"


class WorkerTransport:
    """A worker's DEALER socket: handshake, heartbeats and reconnection to the master."""

    def __init__(self, master: str, identity: NodeIdentity, timeout_s: float = 10.0,
                 frame_log: Callable[[list[bytes]], None] | None = None,
                 security: WorkerSecurity | None = None) -> None:
        self.master = master
        self.security = security
        self.identity = identity
        self.timeout_s = timeout_s
        self.link_delay = LinkDelay.from_env()  # link emulation hook, off unless set
        self.frame_log = frame_log
        self.traffic = Traffic()
        self.wire_dtype = "f32"
        self.session = ""  # the master's session id, from its welcome
        self.clock_offset_s = 0.0
        self.sock: zmq.Socket | None = None
        self.best_rtt_s = float("inf")
        self.ring_port = 0  # set by the worker when it has a ring socket
        self.allreduce = "star"
        self.master_ring_port = 0
        self._pending: list[Message] = []  # arrived during the clock sync, not yet served
        self.last_heard = 0.0
        self.last_sent = 0.0
        self.data_link: DataLink | None = None  # the allreduce's TCP link (edgetp.net.datalink)
        self.data_poller: zmq.Poller | None = None  # the socket and the data link

    def connect(self, give_up_s: float | None = None) -> None:
        """(Re)connect and complete the handshake; retries until ``give_up_s`` (None: forever)."""
        deadline = None if give_up_s is None else time.monotonic() + give_up_s
        self._new_socket()
        while True:
            sent_at = time.time()
            listener = self._data_listener()
            self.send("hello", self.identity.hello_fields(
                self.ring_port, listener.port if listener else 0,
                listener.token if listener else ""))
            message = self._wait_for_handshake_reply()
            if message is not None and message.op == "welcome" and not self._join_data_link(
                    listener, message.fields["data"]):
                message = None  # the master's link did not arrive: say hello again
            if listener is not None:
                listener.close()
            if message is not None:
                if message.op == "refuse":
                    raise HandshakeRefused(f"master refused rank {self.identity.rank}: "
                                           f"{message.fields['reason']}")
                self.wire_dtype = message.fields["wire_dtype"]
                self.session = message.fields["session"]
                self.allreduce = message.fields["allreduce"]
                self.master_ring_port = message.fields["ring_port"]
                self._clock_sample(message.fields["time"], sent_at)
                self._sync_clock()
                log.info("rank %d joined master %s (clock offset %.2f ms, rtt %.2f ms)",
                         self.identity.rank, self.master, self.clock_offset_s * 1e3,
                         self.best_rtt_s * 1e3)
                return
            if deadline is not None and time.monotonic() > deadline:
                raise ClusterError(f"no answer from the master at {self.master}")
            self._new_socket()  # a fresh connection (the master may have restarted)

    def _data_listener(self) -> DataListener | None:
        """Where the master may open the data link (None: the allreduce stays on ZeroMQ)."""
        if self.security is not None or not dataplane.enabled():
            return None
        try:
            return DataListener()
        except OSError as exc:
            log.warning("no data link (%s); the allreduce goes over ZeroMQ", exc)
            return None

    def _join_data_link(self, listener: DataListener | None, offered: bool) -> bool:
        """Accept the master's data link if its welcome offers one; False if it never came."""
        self._close_data_link()
        if not offered or listener is None:
            return not offered
        try:
            self.data_link = listener.accept()
        except DataLinkError as exc:
            log.warning("rank %d: %s; joining again", self.identity.rank, exc)
            return False
        assert self.sock is not None
        self.data_poller = zmq.Poller()
        self.data_poller.register(self.sock, zmq.POLLIN)
        self.data_poller.register(self.data_link.fileno(), zmq.POLLIN)
        return True

    def _close_data_link(self) -> None:
        if self.data_link is not None:
            self.data_link.close()
        self.data_link, self.data_poller = None, None

    def send_partial(self, fields: dict[str, Any], frames: Sequence[torch.Tensor]) -> int:
        """An allreduce's partial to the master, over the data link if there is one; bytes."""
        if self.data_link is None:
            self.send("partial", fields, frames)
            return payload_bytes(frames)
        self.link_delay.before_send("partial")
        try:
            sent = self.data_link.send(dataplane.OP_PARTIAL, self.wire_dtype,
                                       (fields["seq"], fields["step"], fields["index"]), frames)
        except DataLinkError as exc:
            raise ClusterError(str(exc)) from exc
        self.traffic.count_link("partial", sent, sent=True)
        return sent

    def receive_sum(self, wire_dtype: str, shape: Sequence[int], deadline: float
                    ) -> dataplane.Received | None:
        """The next message on the data link (read within ``deadline``)."""
        assert self.data_link is not None
        try:
            got = self.data_link.receive(wire_dtype, shape, deadline)
        except DataLinkError as exc:
            raise ClusterError(f"{exc}; rejoining the master") from exc
        self.last_heard = time.monotonic()
        self.traffic.count_link("sum", got.nbytes, sent=False)
        if self.frame_log is not None:  # as the same sum over ZeroMQ (--capture-frames)
            fields = {"seq": got.seq, "step": got.step, "index": got.index}
            self.frame_log([bytes(f) for f in wire.encode("sum", fields, got.tensors)])
        return got

    def _clock_sample(self, master_time: float, sent_at: float) -> None:
        """Offset = master clock minus ours, from the exchange with the smallest round trip
        (its reply is least likely to have waited), assuming the reply took half of it."""
        received = time.time()
        rtt = received - sent_at
        if rtt < self.best_rtt_s:
            self.best_rtt_s = rtt
            self.clock_offset_s = master_time - (sent_at + received) / 2

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
        _configure(self.sock)
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
            self._clock_sample(message.fields["time"], message.fields["echo"])
        return message

    def close(self) -> None:
        self._close_data_link()
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
