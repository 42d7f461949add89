"""The ring allreduce, an alternative to the star (``--allreduce ring``), for comparison.

Each rank binds a PULL socket (its predecessor pushes to it) and connects a PUSH socket to its
successor: 0 -> 1 -> ... -> N-1 -> 0. An allreduce is a reduce-scatter (N-1 hops: each rank
adds the chunk it receives to its own and passes a chunk on) followed by an all-gather (N-1
hops passing the reduced chunks round). That is 2(N-1) link traversals in sequence where the
star needs 2, but each carries 1/N of the data: on home links, where latency dominates, the
star wins; on fast links with big messages the ring's bandwidth use can win. Reports measure it.

The master sets the ring up: workers report their ring port in the handshake, and before a
request the master tells each worker its successor's address (``link``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import zmq

from edgetp.core.metrics import RECORDER, now
from edgetp.net import wire
from edgetp.net.codec import check_format, check_payload, decode, encode, payload_bytes
from edgetp.net.transport.errors import ClusterError
from edgetp.net.transport.sockets import configure_socket, make_context
from edgetp.net.wire import WireError


class RingError(ClusterError):
    """A ring neighbour did not deliver in time (the step fails; the node stays up)."""


class RingLink:
    """This rank's two ring sockets."""

    def __init__(self, bind_host: str = "*") -> None:
        context = make_context()
        self.pull = context.socket(zmq.PULL)
        configure_socket(self.pull)
        self.pull.bind(f"tcp://{bind_host}:0")
        self.port = int(self.pull.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.push: zmq.Socket | None = None
        self.successor = ""
        self.dropped = 0

    def connect(self, address: str) -> None:
        """Point the PUSH socket at ``address`` (no-op if it already is)."""
        if address == self.successor and self.push is not None:
            return
        if self.push is not None:
            self.push.close(linger=0)
        self.push = make_context().socket(zmq.PUSH)
        configure_socket(self.push)
        self.push.connect(address)
        self.successor = address

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


def successor_addresses(worker_addresses: dict[int, str], n_ranks: int) -> dict[int, str]:
    """For each rank, the ring address of the next one ("" means the master's)."""
    return {r: ("" if r == n_ranks - 1 else worker_addresses[r + 1]) for r in range(n_ranks)}


def master_ring_address(master_url: str, ring_port: int) -> str:
    """The master's ring address as a worker sees it: its host, the master's ring port."""
    host = master_url.removeprefix("tcp://").rsplit(":", 1)[0]
    return f"tcp://{host}:{ring_port}"

