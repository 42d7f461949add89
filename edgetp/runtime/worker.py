"""The worker role: holds one rank's shard, computes its share of every step the master sends.

A worker never sees text, token ids, logits or sampling settings: it receives hidden states
(``step``) and sums (``sum``) and sends partial sums back. It survives the master going away:
it notices through heartbeats and reconnects until the master is back, saying every few
seconds where it is waiting.

A worker that streams its weights survives a file that fails to read (deleted, truncated,
unreadable): the step fails, the worker tells the master why (``health``, shown by ``serve``'s
``/health``), reads the file again on the next step and, while idle, every few seconds, and
tells the master once it reads again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from edgetp.core.errors import ShardError
from edgetp.core.limits import check_kv_slots, default_kv_slots
from edgetp.core.metrics import RECORDER, node_facts, now, spans_to_tensor, window_facts
from edgetp.kernels import native
from edgetp.model.llama import Transformer, batch_problem
from edgetp.net.collectives import StarWorker, StepPosition
from edgetp.net.ring import RingError, WorkerRing
from edgetp.net.security import WorkerSecurity
from edgetp.net.transport import (
    ClusterError,
    HandshakeRefused,
    NodeIdentity,
    ShutdownRequested,
    StepAborted,
    WorkerTransport,
)
from edgetp.net.wire import Message
from edgetp.parallel.loader import load_rank
from edgetp.shard.manifest import read_manifest

log = logging.getLogger("edgetp.runtime.worker")

WAITING_REPORT_S = 5.0  # how often a worker says it is still waiting for its master
WEIGHTS_RETRY_S = 2.0  # how often an idle worker whose weights fail to read tries again
IDLE_RECEIVE_S = 3600.0


class Worker:
    """Rank K's compute loop over a :class:`WorkerTransport`."""

    def __init__(self, shard_dir: str | Path, master: str, timeout_s: float = 10.0,
                 dtype: torch.dtype = torch.float32, max_seq_len: int | None = None,
                 frame_log: Callable[[list[bytes]], None] | None = None,
                 memory_budget: int | None = None,
                 security: WorkerSecurity | None = None, data_port: int = 0,
                 kv_slots: int | None = None) -> None:
        manifest = read_manifest(shard_dir)
        if manifest.rank == 0:
            raise ShardError(f"{shard_dir} is rank 0's shard: run it with `edgetp master`")
        kv_slots = check_kv_slots(default_kv_slots(memory_budget) if kv_slots is None
                                  else kv_slots)
        identity = NodeIdentity(manifest.rank, manifest.fingerprint, manifest.plan.to_json(),
                                manifest.dtype, kv_slots)
        self.transport = WorkerTransport(master, identity, timeout_s, frame_log, security,
                                         data_port)
        self.comm = WorkerCommunicator(self.transport, manifest.rank, manifest.plan.n_ranks,
                                       timeout_s)
        self.model: Transformer = load_rank(shard_dir, self.comm, dtype, max_seq_len,
                                            memory_budget=memory_budget, kv_slots=kv_slots)
        self.kv_slots = kv_slots
        self.layers = manifest.plan.shared_layers
        self.n_allreduce = 2 * len(self.layers)
        self.rank = manifest.rank
        self._last_step: tuple[int, int] = (-1, -1)
        self._order_session = ""  # the master session _last_step belongs to
        self._written_session = ""  # the master session _written belongs to
        self._written: dict[int, int] = {}  # KV slot -> the positions written in it
        self.memory_budget = memory_budget
        self._reported_failure: str | None = None  # the weights failure the master knows of

    def serve(self) -> None:
        """Serve steps until the master says shutdown; reconnect whenever the master is lost."""
        self._join()
        try:
            while True:
                try:
                    message = self.transport.receive(timeout_s=self._idle_timeout_s())
                    if message is None:
                        self._retry_weights()
                    elif message.op == "shutdown":
                        return
                    else:
                        self._handle(message)
                except StepAborted as exc:
                    log.info("rank %d: %s", self.rank, exc)
                except ShutdownRequested:
                    return
                except HandshakeRefused:
                    raise
                except RingError as exc:  # a neighbour failed: the step fails, we stay up
                    log.warning("%s", exc)
                    self.transport.send("error", {"message": str(exc)})
                except ClusterError as exc:
                    log.warning("rank %d: %s; reconnecting", self.rank, exc)
                    self._join()
        finally:
            self.transport.close()
            self.comm.ring.close()

    def _handle(self, message: Message) -> None:
        if message.op == "step":
            self._run_step(message)
            self._report_weights()
        elif message.op == "collect":
            self._send_stats(message.fields["seq"])
        elif message.op == "link":
            self.comm.ring.link(message.fields)

    def _idle_timeout_s(self) -> float:
        """How long to wait for the master's next message before looking at the weights."""
        failing = self.weights_failure() is not None or self._reported_failure is not None
        return WEIGHTS_RETRY_S if failing else IDLE_RECEIVE_S

    def _join(self) -> None:
        """(Re)join the master, saying every few seconds where we wait for it; open the ring if
        its welcome chose the ring (else close it)."""
        started = time.monotonic()
        log.info("rank %d: joining the master at %s", self.rank, self.transport.master)
        while True:
            try:
                self.transport.connect(give_up_s=WAITING_REPORT_S)
            except HandshakeRefused:
                raise
            except ClusterError:
                log.info("rank %d: still waiting for the master at %s (%.0f s); is it "
                         "running, and is that address right?", self.rank, self.transport.master,
                         time.monotonic() - started)
                continue
            try:
                self.comm.ring.follow_welcome()
                break
            except ClusterError as exc:
                log.warning("rank %d: %s", self.rank, exc)
                time.sleep(1.0)
        self._reported_failure = None  # a new master (or session) knows nothing yet
        self._report_weights()

    # -- weights that fail to read (a streamed file deleted, truncated, unreadable) -----------

    def weights_failure(self) -> str | None:
        """Why this worker's weights fail to read, or None when they read (or all are resident)."""
        window = getattr(self.model, "window", None)
        return None if window is None else window.failure

    def _retry_weights(self) -> None:
        """Idle: report what the last retry found, then read the failed block again."""
        self._report_weights()
        window = getattr(self.model, "window", None)
        if window is not None and window.failure is not None:
            window.retry()

    def _report_weights(self) -> None:
        """Tell the master when our weights start or stop failing to read."""
        failure = self.weights_failure()
        if failure == self._reported_failure:
            return
        if failure is None:
            log.info("rank %d: weights read again", self.rank)
        else:
            log.error("rank %d: weights fail to read: %s", self.rank, failure)
        self.transport.send("health", {"weights": failure or ""})
        self._reported_failure = failure

    @torch.inference_mode()
    def _run_step(self, message: Message) -> None:
        fields = message.fields
        h = message.tensors[0]  # [T, d]
        problem = (self._check_step(h, fields["slots"], fields["starts"])
                   or self._check_order(fields) or self._check_positions(fields, h.shape[0]))
        if problem:
            log.warning("rank %d: rejected a step: %s", self.rank, problem)
            self.transport.send("error", {"message": f"rank {self.rank}: {problem}"})
            return
        self.comm.position.begin(fields["seq"], fields["step"], self.n_allreduce)
        started = now()
        try:
            self.model.forward_step(h.float(), fields["slots"], fields["starts"], self.layers)
            RECORDER.add("step", fields["step"], started, now())
        except (RuntimeError, ValueError) as exc:
            if isinstance(exc, ClusterError | StepAborted | ShutdownRequested):
                raise
            log.exception("rank %d: step failed", self.rank)
            self.transport.send("error", {"message": f"rank {self.rank}: {exc}"})

    def _send_stats(self, seq: int) -> None:
        """Ship this node's spans (on the master's clock) and counters to the master."""
        traffic = self.transport.traffic
        facts = {**node_facts(), **window_facts(self.model), "rank": self.rank,
                 "threads_native": native.threads(),
                 "bytes_sent": traffic.bytes_sent, "bytes_received": traffic.bytes_received,
                 "memory_budget_bytes": self.memory_budget or 0,
                 "clock_offset_s": self.transport.clock_offset_s}
        spans = spans_to_tensor(RECORDER.take(), self.transport.clock_offset_s)
        self.transport.send("stats", {"seq": seq, "stats": facts}, [spans])

    def _check_order(self, fields: dict) -> str | None:
        """Steps of a request come in increasing order; an older one is a replay or stale."""
        key = (fields["seq"], fields["step"])
        if self._order_session != self.transport.session:  # a new (restarted) master counts
            self._order_session, self._last_step = self.transport.session, (-1, -1)  # from 1
        if key <= self._last_step:
            return f"out-of-order step {key} after {self._last_step}"
        self._last_step = key
        return None

    def _check_positions(self, fields: dict, rows: int) -> str | None:
        """Each sequence's rows start where its slot's written positions end (the next token)
        or before (a speculative step's rejected positions are overwritten, and a new sequence
        starts its slot at 0: the rollback and the reuse are this position reset); a step
        beyond them would attend to stale keys and values."""
        if self._written_session != self.transport.session:  # a new (restarted) master
            self._written_session, self._written = self.transport.session, {}
        slots, starts = fields["slots"], fields["starts"]
        counts = [rows] if len(slots) == 1 else [1] * rows
        written = dict(self._written)  # rows in order: a slot's next row follows its last
        for slot, start, count in zip(slots, starts, counts, strict=True):
            if start > written.get(slot, 0):
                return (f"a step at position {start} leaves a gap after the "
                        f"{written.get(slot, 0)} positions written in KV slot {slot}")
            written[slot] = start + count
        self._written = written
        return None

    def _check_step(self, h: torch.Tensor, slots: list[int], starts: list[int]) -> str | None:
        hidden, context = self.model.config.hidden_size, self.model.max_seq_len
        if h.dim() != 2 or h.shape[1] != hidden:
            return f"hidden state of shape {list(h.shape)}, expected [T, {hidden}]"
        rows = h.shape[0]
        if len(slots) != len(starts) or len(slots) not in (1, rows):
            return (f"a step of {rows} rows names {len(slots)} KV slots and {len(starts)} "
                    "starts: one of each for one sequence, or one per row for a decode batch")
        problem = batch_problem(slots, starts, rows) if len(slots) > 1 else None
        if problem:
            return problem
        if max(slots) >= self.kv_slots:
            return (f"KV slot {max(slots)} beyond this worker's {self.kv_slots} "
                    "(--kv-slots): start it with more, or lower the master's --max-batch")
        end = starts[0] + rows if len(slots) == 1 else max(starts) + 1
        if end > context:
            return f"positions up to {end} exceed the context of {context}"
        return None


class WorkerCommunicator:
    """The worker's allreduce: star or ring, as the master announced in the welcome."""

    def __init__(self, transport: WorkerTransport, rank: int, world_size: int,
                 timeout_s: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.transport = transport
        self.position = StepPosition()
        self.star = StarWorker(transport, rank, world_size, timeout_s)
        self.star.position = self.position
        self.ring = WorkerRing(transport, rank, world_size, self.position, timeout_s)

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.transport.allreduce == "ring":
            return self.ring.allreduce(x)
        return self.star.allreduce(x)


def frame_recorder(path: Path) -> Callable[[list[bytes]], None]:
    """A frame log appending each received message as one msgpack list of frames."""
    import msgpack

    def record(frames: list[bytes]) -> None:
        with path.open("ab") as handle:
            handle.write(msgpack.packb(frames, use_bin_type=True))

    return record
