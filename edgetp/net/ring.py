"""The ring allreduce, an alternative to the star (``--allreduce ring``), for comparison.

Each rank binds a PULL socket (its predecessor pushes to it) and connects a PUSH socket to its
successor: 0 -> 1 -> ... -> N-1 -> 0. An allreduce is a reduce-scatter (N-1 hops: each rank
adds the chunk it receives to its own and passes a chunk on) followed by an all-gather (N-1
hops passing the reduced chunks round). That is 2(N-1) link traversals in sequence where the
star needs 2, but each carries 1/N of the data: on home links, where latency dominates, the
star wins; on fast links with big messages the ring's bandwidth use can win. Reports measure it.

The master sets the ring up, and only when it runs one: its welcome says ``ring``, and only
then does a worker open its ring listener, on the interface it reaches the master from, and
announce it (``ring_open``); before a request the master tells each worker its successor
(``link``). A listener admits only its cluster: with the cluster's CURVE keys it is a CURVE
server that admits only the cluster's public keys (the welcome lists them), and the PUSH side
knows its successor's key, so a link is encrypted and authenticated both ways; without keys,
only a PUSH socket showing the random token the listener announced (edgetp.net.security).
Whom a listener admits is settled when it opens: ZeroMQ never retries a connection ZAP refused.
What an admitted peer may queue is bounded: :data:`RING_QUEUE` messages, none over
:data:`RING_MAX_FRAME_BYTES` (a chunk of the largest step, see edgetp.core.limits).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import zmq

from edgetp.core.limits import MAX_STEP_BYTES
from edgetp.core.metrics import RECORDER, now
from edgetp.net import wire
from edgetp.net.codec import check_format, check_payload, decode, encode, payload_bytes
from edgetp.net.security import (
    KeyPair,
    admit_keys,
    make_client,
    make_server,
    present_token,
    require_token,
)
from edgetp.net.transport.errors import ClusterError
from edgetp.net.transport.sockets import (
    configure_socket,
    local_address_towards,
    make_context,
    url_host_port,
)
from edgetp.net.wire import WireError

if TYPE_CHECKING:
    from edgetp.net.transport import WorkerTransport

RING_QUEUE = 8  # messages a predecessor may have queued (it is at most a few hops ahead)
RING_MAX_FRAME_BYTES = MAX_STEP_BYTES + wire.MAX_HEADER_BYTES  # a chunk of a step, or a header
TOKEN_BYTES = 16


class RingError(ClusterError):
    """A ring neighbour did not deliver in time (the step fails; the node stays up)."""


@dataclass(frozen=True)
class RingPeer:
    """A rank's ring listener as its predecessor needs it: where it is, and what admits a
    connection there (its CURVE public key, z85; or, without keys, its token)."""

    address: str  # tcp://HOST:PORT ("" in a ``link``: the master's, as the worker reaches it)
    key: str = ""
    token: str = ""


class RingLink:
    """This rank's two ring sockets: the listener (PULL) and the link to its successor (PUSH).

    ``keys``: this node's CURVE key pair and ``members`` the public keys its listener admits
    (the cluster has keys); or None, and the listener admits the holder of :attr:`token`.
    """

    def __init__(self, bind_host: str, keys: KeyPair | None = None,
                 members: frozenset[bytes] = frozenset()) -> None:
        context = make_context()
        self.keys = keys
        self.pull = context.socket(zmq.PULL)
        configure_socket(self.pull)
        self.pull.setsockopt(zmq.RCVHWM, RING_QUEUE)
        self.pull.setsockopt(zmq.MAXMSGSIZE, RING_MAX_FRAME_BYTES)
        self.token = ""
        if keys is not None:
            make_server(self.pull, keys)
            admit_keys(self.pull, members)
        else:
            self.token = secrets.token_hex(TOKEN_BYTES)
            require_token(self.pull, self.token)
        self.bind_host, self.members = bind_host, members
        self.pull.bind(f"tcp://{bind_host}:0")
        self.port = int(self.pull.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.public_key = "" if keys is None else keys.public.decode()
        self.push: zmq.Socket | None = None
        self.successor: RingPeer | None = None
        self.dropped = 0

    def connect(self, successor: RingPeer) -> None:
        """Point the PUSH socket at ``successor`` (no-op if it already is)."""
        if successor == self.successor and self.push is not None:
            return
        if self.push is not None:
            self.push.close(linger=0)
        self.push = make_context().socket(zmq.PUSH)
        configure_socket(self.push)
        if self.keys is not None:
            make_client(self.push, self.keys, successor.key.encode())
        else:
            present_token(self.push, successor.token)
        self.push.connect(successor.address)
        self.successor = successor

    def send(self, fields: dict[str, Any], tensors: torch.Tensor | list[torch.Tensor]) -> None:
        if self.push is None:
            raise RingError("the ring is not set up (no successor address from the master)")
        frames = [tensors] if isinstance(tensors, torch.Tensor) else tensors
        self.push.send_multipart(wire.encode("ring", fields, frames), copy=False)

    def receive(self, timeout_s: float) -> wire.Message | None:
        if not self.pull.poll(max(0, int(timeout_s * 1000))):
            return None
        frames = self.pull.recv_multipart(copy=False)
        try:
            return wire.decode(frames)
        except WireError:
            self.dropped += 1
            return None

    def close(self) -> None:
        self.pull.close(linger=0)
        if self.push is not None:
            self.push.close(linger=0)


class RingAllreduce:
    """A :class:`~edgetp.net.collectives.Communicator` over a :class:`RingLink`."""

    def __init__(self, rank: int, world_size: int, link: RingLink, position: Any,
                 wire_dtype: str = "f32", timeout_s: float = 10.0) -> None:
        self.rank = rank
        self.world_size = world_size
        self.link = link
        self.position = position  # a StepPosition shared with the step loop
        self.wire = check_format(wire_dtype)  # f32, bf16 or int8 (edgetp.net.codec)
        self.timeout_s = timeout_s

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, d]
        started = now()
        index, _last = self.position.advance()
        total = x.float().clone()  # [T, d], reduced in place chunk by chunk
        parts = list(total.tensor_split(self.world_size, dim=-1))  # views, [T, ~d/N] each
        n, r = self.world_size, self.rank
        moved = 0
        for hop in range(n - 1):  # reduce-scatter
            moved += self._pass(encode(parts[(r - hop) % n], self.wire), index, hop)
            target = parts[(r - hop - 1) % n]
            target += decode(self._take(index, hop, target.shape), self.wire)
        own = parts[(r + 1) % n]
        frames = encode(own, self.wire)
        own.copy_(decode(frames, self.wire))  # every rank keeps the same rounding
        for hop in range(n - 1):  # all-gather: pass on the very frames received
            moved += self._pass(frames, index, n - 1 + hop)
            target = parts[(r - hop) % n]
            frames = self._take(index, n - 1 + hop, target.shape)
            target.copy_(decode(frames, self.wire))
        RECORDER.add("allreduce", index, started, now(), 2 * moved)
        return total.to(x.dtype)

    def _pass(self, frames: list[torch.Tensor], index: int, hop: int) -> int:
        pos = self.position
        self.link.send({"seq": pos.seq, "step": pos.step, "index": index, "hop": hop}, frames)
        return payload_bytes(frames)

    def _take(self, index: int, hop: int, shape: torch.Size) -> list[torch.Tensor]:
        pos = self.position
        wanted = (pos.seq, pos.step, index, hop)
        deadline = time.monotonic() + self.timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.link.receive(remaining)
            if message is None:
                continue
            f = message.fields
            if (f["seq"], f["step"], f["index"], f["hop"]) == wanted:
                problem = check_payload(message.tensors, self.wire, shape)
                if problem:
                    raise RingError(f"rank {self.rank}: the ring predecessor sent a chunk "
                                    f"{problem}")
                return message.tensors
        raise RingError(f"rank {self.rank}: rank {(self.rank - 1) % self.world_size} sent "
                        f"nothing on the ring within {self.timeout_s:g} s")


class WorkerRing:
    """A worker's side of the ring: its :class:`RingLink`, opened only when the master's
    welcome chooses the ring, on the interface the worker reaches the master from."""

    def __init__(self, transport: WorkerTransport, rank: int, world_size: int, position: Any,
                 timeout_s: float) -> None:
        self.transport = transport
        self.rank, self.world_size = rank, world_size
        self.position = position  # the StepPosition the star shares
        self.timeout_s = timeout_s
        self.comm: RingAllreduce | None = None

    def follow_welcome(self) -> None:
        """After each (re)join: with the ring, open the listener (again, if the interface to
        the master or the cluster's keys changed) and announce it to the master; without the
        ring, close it."""
        if self.transport.allreduce != "ring":
            self.close()
            return
        try:
            host = local_address_towards(self.transport.master)
        except OSError as exc:
            raise ClusterError(f"no interface reaches the master at {self.transport.master} "
                               f"for the ring ({exc}); joining again") from exc
        members = frozenset(key.encode() for key in self.transport.ring_keys.split())
        if self.comm is not None and (self.comm.link.bind_host, self.comm.link.members) != (
                host, members):
            self.close()
        if self.comm is None:
            security = self.transport.security
            link = RingLink(host, None if security is None else security.keys, members)
            self.comm = RingAllreduce(self.rank, self.world_size, link, self.position,
                                      self.transport.wire_dtype, self.timeout_s)
        link = self.comm.link
        self.transport.send("ring_open", {"port": link.port, "token": link.token})

    def link(self, fields: dict[str, Any]) -> None:
        """The master's ``link``: connect to our successor."""
        if self.comm is None:
            raise RingError(f"rank {self.rank}: told to link a ring it has not opened")
        address = fields["address"] or master_ring_address(self.transport.master,
                                                           self.transport.master_ring_port)
        self.comm.link.connect(RingPeer(address, fields["key"], fields["token"]))

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, d]
        if self.comm is None:
            raise RingError(f"rank {self.rank}: the master runs the ring, but this rank's ring "
                            "is not open (it joins again)")
        self.comm.wire = self.transport.wire_dtype
        return self.comm.allreduce(x)

    def close(self) -> None:
        if self.comm is not None:
            self.comm.link.close()
            self.comm = None


def successors(listeners: dict[int, RingPeer]) -> dict[int, RingPeer]:
    """For each rank of a ring of ``len(listeners)`` ranks (rank 0 the master, its address
    ""), its successor's listener."""
    n = len(listeners)
    return {r: listeners[(r + 1) % n] for r in range(n)}


def link_fields(successor: RingPeer) -> dict[str, str]:
    """The ``link`` message that tells a worker its ring successor."""
    return {"address": successor.address, "key": successor.key, "token": successor.token}


def master_ring_address(master_url: str, ring_port: int) -> str:
    """The master's ring address as a worker sees it: its host, the master's ring port."""
    host, _ = url_host_port(master_url)
    return f"tcp://{host}:{ring_port}"
