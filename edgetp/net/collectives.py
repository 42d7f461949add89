"""Collectives over a :class:`Communicator`: allreduce (sum) between the ranks of one model.

Implementations of :class:`edgetp.parallel.comm.Communicator`: :class:`InProcessGroup` (ranks
as threads of one process, for tests) and the star over ZeroMQ (:class:`StarMaster`,
:class:`StarWorker`); the group of one is :class:`edgetp.parallel.comm.SoloCommunicator`. Every
implementation sums partials in rank order, so a result never depends on arrival order.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from edgetp.core.metrics import RECORDER, now
from edgetp.net import datalink
from edgetp.net.codec import (
    carried_format,
    check_format,
    check_payload,
    decode,
    encode,
    pair_sum,
    payload_bytes,
    star_sum,
)
from edgetp.net.datalink import OP_PARTIAL, OP_SUM, DataLink, DataLinkError, message_bytes
from edgetp.net.transport import (
    ClusterError,
    MasterTransport,
    ShutdownRequested,
    StepAborted,
    WorkerTransport,
)
from edgetp.net.wire import Message


class InProcessGroup:
    """Ranks as threads of one process, summing through shared slots and a barrier."""

    def __init__(self, world_size: int, timeout_s: float = 60.0, wire: str = "f32") -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.wire = check_format(wire)  # not f32: partials and sums rounded as the star's
        self._slots: list[torch.Tensor | None] = [None] * world_size
        self._result: torch.Tensor | None = None
        self._barrier = threading.Barrier(world_size, timeout=timeout_s)

    def communicator(self, rank: int) -> InProcessCommunicator:
        return InProcessCommunicator(self, rank)

    def allreduce(self, rank: int, x: torch.Tensor) -> torch.Tensor:
        """Rank ``rank``'s part of one allreduce: its partial in, everyone's sum out."""
        self._slots[rank] = x
        if self._barrier.wait() == 0:  # one thread sums, in rank order
            if self.wire != "f32":  # as StarMaster: rank 0 is the master
                own, *parts = self._slots
                frames = [encode(p, self.wire) for p in parts]  # type: ignore[arg-type]
                self._result = star_sum(own, frames, self.wire)[0].to(x.dtype)  # type: ignore
            else:
                total = self._slots[0].float().clone()  # type: ignore[union-attr]
                for part in self._slots[1:]:
                    total += part.float()  # type: ignore[union-attr]
                self._result = total.to(x.dtype)
        self._barrier.wait()
        result = self._result
        assert result is not None
        out = result.clone()
        self._barrier.wait()  # nobody overwrites the slots before everyone has read
        return out


class InProcessCommunicator:
    def __init__(self, group: InProcessGroup, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.world_size = group.world_size

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.allreduce(self.rank, x)


def summed_pair(x: torch.Tensor, master: list[torch.Tensor], worker: list[torch.Tensor],
                rank: int, wire: str) -> torch.Tensor:
    """A two-rank exchange's sum on rank ``rank``, whose partial is ``x``: the master's frames
    plus the worker's, bitwise :func:`~edgetp.net.codec.pair_sum` on both ends. A float32
    partial on the f32 wire takes the peer's frame in place (a Communicator's partial is its
    to sum into; addition commutes, so these are the peer's bits too): a prefill chunk's
    allreduce then allocates and copies no 1 MiB. A bfloat16 partial carried as bf16 is
    summed in bfloat16 (each element's float32 sum rounded once: the bits pair_sum's float32
    sum has once cast to the partial's dtype, as the caller does), four copies fewer."""
    if wire == "f32" and x.dtype == torch.float32 and x.is_contiguous():
        return x.add_((worker if rank == 0 else master)[0])
    if wire == "bf16" and x.dtype == torch.bfloat16:
        return torch.add(master[0], worker[0])  # [T, d] bfloat16
    return pair_sum(master, worker, wire)


# -- the star over ZeroMQ ----------------------------------------------------------------------


@dataclass
class StepPosition:
    """Which allreduce of which step of which request a communicator is at."""

    seq: int = 0
    step: int = 0
    index: int = 0
    total: int = 0  # allreduces per step; the last one is a reduce to the master only

    def begin(self, seq: int, step: int, total: int) -> None:
        self.seq, self.step, self.index, self.total = seq, step, 0, total

    def advance(self) -> tuple[int, bool]:
        """The current allreduce's index and whether it is the step's last; moves on."""
        if self.index >= self.total:
            raise RuntimeError(f"allreduce {self.index} beyond the {self.total} of this step")
        index, self.index = self.index, self.index + 1
        return index, index == self.total - 1


class StarMaster:
    """Rank 0 of the star: gathers partials, sums them in rank order, sends the sum back."""

    rank = 0

    def __init__(self, transport: MasterTransport, wire_dtype: str = "f32",
                 timeout_s: float = 10.0) -> None:
        self.transport = transport
        self.world_size = transport.n_ranks
        self.wire = check_format(wire_dtype)  # f32, bf16 or int8 (edgetp.net.codec)
        self.carried = self.wire  # the current allreduce's (codec.carried_format)
        self.timeout_s = timeout_s
        self.position = StepPosition()
        self.wait_s = 0.0  # time spent waiting for partials (for the reports)

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, d] partial
        started = now()
        index, last = self.position.advance()
        pos = self.position
        fields = {"seq": pos.seq, "step": pos.step, "index": index}
        self.carried = carried_format(self.wire, x.dtype, x.numel())  # as every worker's
        if self.exchanges():
            total, nbytes = self._exchange(index, fields, x, last)
        else:
            parts = self._gather(index, x.shape)
            # the master's partial rounded like the workers'; rank order: not arrival order
            total, frames = star_sum(x, [parts[r] for r in self.transport.worker_ranks],
                                     self.carried)
            nbytes = self.transport.send_sum(fields, frames, self.carried) if not last else 0
            nbytes += sum(payload_bytes(p) for p in parts.values())
        RECORDER.add("allreduce", index, started, now(), nbytes)
        return total.to(x.dtype)

    def _exchange(self, index: int, fields: dict[str, int], x: torch.Tensor, last: bool
                  ) -> tuple[torch.Tensor, int]:
        """A two-rank exchange (see :meth:`exchanges`): the sum and the bytes moved. The
        master's partial is sent before waiting, so it travels while the worker computes; on
        a plain float32 link with a decode-sized partial, send, wait, read and sum are one
        native call (:meth:`MasterTransport.exchange`) when the worker's partial comes within
        the spin, else its partial is gathered as usual. Bitwise the worker's sum either way
        (:func:`~edgetp.net.codec.pair_sum`)."""
        transport = self.transport
        if not last and transport.exchanges_natively(1, x, self.carried):
            started = time.perf_counter()
            total = transport.exchange(1, fields, x)
            self.wait_s += time.perf_counter() - started
            nbytes = message_bytes(x)
            if total is not None:
                return total, 2 * nbytes
            own = [x]  # what was sent: the f32 wire's frame
        else:
            own = encode(x, self.carried)  # what the worker gets, and adds as the master does
            nbytes = transport.send_own_partial(1, fields, own, self.carried) if not last else 0
        parts = self._gather(index, x.shape)
        return (summed_pair(x, own, parts[1], 0, self.carried),
                nbytes + payload_bytes(parts[1]))

    def exchanges(self) -> bool:
        """Whether this allreduce is a two-rank exchange: with one worker on a data link, the
        master sends its own partial instead of waiting to send the sum, and the worker adds
        the two itself (:func:`~edgetp.net.codec.pair_sum`, bitwise the master's sum). The
        worker then waits for a one-way trip instead of a round trip plus the master's sum."""
        return self.world_size == 2 and 1 in self.transport.data_links

    def _describe_late(self, rank: int) -> str:
        """A late worker with its timings: when it was last heard from, which allreduce."""
        peer = self.transport.peers.get(rank)
        if peer is None:
            return self.transport.describe(rank) + " (disconnected)"
        silent = time.monotonic() - peer.last_seen
        pos = self.position
        return (f"{self.transport.describe(rank)} (last message {silent:.1f} s ago; stuck at "
                f"allreduce {pos.index - 1} of {pos.total} in step {pos.step})")

    def _gather(self, index: int, shape: torch.Size) -> dict[int, list[torch.Tensor]]:
        """Every worker's partial of allreduce ``index``: from its data link or from ZeroMQ."""
        parts: dict[int, list[torch.Tensor]] = {}
        started = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        transport = self.transport
        while len(parts) < self.world_size - 1:
            if self._read_first_ready(index, shape, deadline, parts):
                continue  # a partial came while watching the links
            remaining = deadline - time.monotonic()
            ready = dict(transport.data_poller.poll(max(1, int(remaining * 1000)))
                         if remaining > 0 else ())
            if not ready:
                raise self._timeout(parts)
            for rank, link in list(transport.data_links.items()):
                if rank not in parts and link.fileno() in ready:
                    self._read_link(rank, link, index, shape, deadline, parts)
            while transport.sock in ready and (got := transport.receive(0)) is not None:
                self._take_message(*got, index, shape, parts)  # ZeroMQ: errors, other ranks
        self.wait_s += time.perf_counter() - started
        return parts

    def _read_first_ready(self, index: int, shape: torch.Size, deadline: float,
                          parts: dict[int, list[torch.Tensor]]) -> bool:
        """Read the partial of the first data link whose bytes come within the transport's
        spin; False when none came by then (the caller blocks in its poller)."""
        waiting = [(rank, link) for rank, link in self.transport.data_links.items()
                   if rank not in parts]
        ready = datalink.first_readable([link for _, link in waiting], self.transport.spin_s)
        if ready is None:
            return False
        self._read_link(*waiting[ready], index, shape, deadline, parts)
        return True

    def _timeout(self, parts: dict[int, list[torch.Tensor]]) -> ClusterError:
        late = [self._describe_late(r) for r in self.transport.worker_ranks if r not in parts]
        return ClusterError(f"{', '.join(late)} did not answer within {self.timeout_s:g} s "
                            "(dead, overloaded or cut off); the request was abandoned")

    def _read_link(self, rank: int, link: DataLink, index: int, shape: torch.Size,
                   deadline: float, parts: dict[int, list[torch.Tensor]]) -> None:
        try:
            got = link.receive(self.carried, shape, deadline, (self.position.seq,
                                                            self.position.step))
        except DataLinkError as exc:
            self.transport.drop_data_link(rank)
            raise ClusterError(f"{self.transport.describe(rank)}: {exc}; the request was "
                               "abandoned (the worker rejoins)") from exc
        self.transport.heard_from(rank)
        self.transport.traffic.count_link("partial", got.nbytes, sent=False)
        pos = self.position
        if got.op != OP_PARTIAL or (got.seq, got.step, got.index) != (pos.seq, pos.step, index):
            return  # stale: from an abandoned request or step
        self._accept(rank, got.tensors, shape, parts)

    def _take_message(self, rank: int, message: Message, index: int, shape: torch.Size,
                      parts: dict[int, list[torch.Tensor]]) -> None:
        if message.op == "error":
            raise ClusterError(f"{self.transport.describe(rank)} failed: "
                               f"{message.fields['message']}")
        f, pos = message.fields, self.position
        if message.op != "partial" or (f["seq"], f["step"], f["index"]) != (
                pos.seq, pos.step, index):
            return  # stale: from an abandoned request or step
        self._accept(rank, message.tensors, shape, parts)

    def _accept(self, rank: int, tensors: list[torch.Tensor], shape: torch.Size,
                parts: dict[int, list[torch.Tensor]]) -> None:
        problem = check_payload(tensors, self.carried, shape)
        if problem:
            raise ClusterError(f"{self.transport.describe(rank)} sent a partial {problem}")
        parts[rank] = tensors


class StarWorker:
    """A worker rank of the star: sends its partial, waits for the sum (except for the last)."""

    def __init__(self, transport: WorkerTransport, rank: int, world_size: int,
                 timeout_s: float = 10.0) -> None:
        self.transport = transport
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.position = StepPosition()
        self.wait_s = 0.0

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, d] partial
        started = now()
        index, last = self.position.advance()
        pos = self.position
        # as the master announced in the welcome; a bfloat16 partial on the f32 wire as bf16
        wire = carried_format(self.transport.wire_dtype, x.dtype, x.numel())
        fields = {"seq": pos.seq, "step": pos.step, "index": index}
        if not last and self.world_size == 2 and self.transport.exchanges_natively(x, wire):
            total = self.transport.exchange(fields, x)  # sent; the sum if the master's
            sent, frames = message_bytes(x), [x]  # partial came within the spin
            if total is not None:
                self.wait_s += now() - started
                RECORDER.add("allreduce", index, started, now(), 2 * sent)
                return total
        else:
            frames = encode(x, wire)
            sent = self.transport.send_partial(fields, frames, wire)
        if last:  # a reduce: only the master needs the final sum
            RECORDER.add("allreduce", index, started, now(), sent)
            return x
        op, tensors = self._wait_for_sum(index, x.shape, wire)
        if op == OP_PARTIAL:  # a two-rank exchange: the master's partial, summed here
            total = summed_pair(x, tensors, frames, self.rank, wire)
        elif wire == "f32" and self.transport.data_link:  # the link's buffer itself, valid
            total = tensors[0]  # until the next sum but one
        else:
            total = decode(tensors, wire)
        self.wait_s += now() - started
        RECORDER.add("allreduce", index, started, now(), 2 * sent)
        return total.to(x.dtype)

    def _wait_for_sum(self, index: int, shape: torch.Size, wire: str
                      ) -> tuple[int, list[torch.Tensor]]:
        """This allreduce's sum (OP_SUM), or in a two-rank exchange the master's partial
        (OP_PARTIAL), with its tensors."""
        pos, transport = self.position, self.transport
        op = OP_SUM
        deadline = time.monotonic() + self.timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            if transport.data_link is None:
                message = transport.receive(remaining)
                if message is None:
                    break
                tensors = self._sum_in(message, index)
            else:
                tensors = None
                if transport.data_link_readable(remaining):
                    got = transport.receive_sum(wire, shape, deadline, (pos.seq, pos.step))
                    if (got.seq, got.step, got.index) == (pos.seq, pos.step, index):
                        op, tensors = got.op, got.tensors
                while tensors is None and (message := transport.receive_now()) is not None:
                    self._sum_in(message, index)  # aborts and shutdowns raise; others: stale
            if tensors is not None:
                problem = check_payload(tensors, wire, shape)
                if problem:
                    raise ClusterError(f"the master sent a sum {problem}")
                return op, tensors
        raise ClusterError(f"no sum from the master within {self.timeout_s:g} s")

    def _sum_in(self, message: Message, index: int) -> list[torch.Tensor] | None:
        """The tensors of ``message`` if it is this allreduce's sum; raises on abort/shutdown."""
        pos = self.position
        if message.op == "abort" and message.fields["seq"] == pos.seq:
            raise StepAborted(f"the master abandoned request {pos.seq}")
        if message.op == "shutdown":
            raise ShutdownRequested("the master is shutting down")
        f = message.fields
        if message.op == "sum" and (f["seq"], f["step"], f["index"]) == (
                pos.seq, pos.step, index):
            return message.tensors
        return None
