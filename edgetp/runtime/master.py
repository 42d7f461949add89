"""The master role: the only node that sees text, token ids, logits and sampling settings.

A :class:`Master` owns the tokenizer and an :class:`~edgetp.runtime.engine.Engine` over a
runner. With no workers the runner is the whole model in this process; a cluster master's runner
drives its workers (see ``edgetp.runtime.local``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.core.allocator import keep_freed_memory
from edgetp.core.errors import ConfigError, ShardError
from edgetp.core.limits import (
    DEFAULT_MAX_BATCH,
    PREFILL_CHUNK,
    check_max_batch,
    master_prefill_chunk,
)
from edgetp.core.metrics import RECORDER, now, spans_from_tensor
from edgetp.kernels import native as kernels
from edgetp.model.llama import Transformer
from edgetp.model.tokenizer import Tokenizer
from edgetp.net.collectives import StarMaster, StepPosition
from edgetp.net.ring import RingAllreduce, RingLink, RingPeer, link_fields, successors
from edgetp.net.security import MasterSecurity
from edgetp.net.transport import ClusterError, MasterTransport, NodeIdentity, Traffic
from edgetp.net.transport.sockets import url_host_port
from edgetp.parallel.comm import SoloCommunicator
from edgetp.runtime.engine import (
    Engine,
    GenerationResult,
    LocalRunner,
    Runner,
    one_sequence_rows,
)
from edgetp.runtime.speculation import (
    DEFAULT_DRAFT_TOKENS,
    Speculation,
    check_draft_tokens,
    open_drafter,
)
from edgetp.shard.plan import ShardPlan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown compute dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class Prompt:
    """A user prompt: raw text, or (``chat=True``) one user message rendered by the template."""

    text: str
    chat: bool = False
    system: str | None = None


MasterCommunicator = StarMaster | RingAllreduce | SoloCommunicator


def _master_communicator(transport: MasterTransport, allreduce: str, wire_dtype: str,
                         timeout_s: float, position: StepPosition,
                         security: MasterSecurity | None) -> StarMaster | RingAllreduce:
    """Rank 0's allreduce, star or ring, counting its allreduces in ``position``. The ring
    listens where the master's socket does, with the master's keys if it has keys."""
    if allreduce == "star":
        star = StarMaster(transport, wire_dtype, timeout_s)
        star.position = position
        return star
    if allreduce != "ring":
        raise ConfigError(f"--allreduce {allreduce!r}: choose star or ring")
    host, _ = url_host_port(transport.address)
    link = RingLink(host, None if security is None else security.keys, transport.members)
    transport.allreduce, transport.ring_port = "ring", link.port
    return RingAllreduce(0, transport.n_ranks, link, position, wire_dtype, timeout_s)


class ClusterRunner:
    """The master's runner: embeds, drives the workers through each step, applies the head.

    One step: the master runs its private first layers, sends the hidden state to every worker
    (``step``), runs the shared layers with the star allreduce, runs its private last layers,
    and only then the final norm and the lm_head. Prompts go in chunks of at most
    ``prefill_chunk`` tokens so no message outgrows the link.
    """

    def __init__(self, model: Transformer, transport: MasterTransport, comm: MasterCommunicator,
                 position: StepPosition, plan: ShardPlan, prefill_chunk: int = PREFILL_CHUNK,
                 join_timeout_s: float = 10.0, kv_slots: int = 1) -> None:
        self.model = model
        self.transport = transport
        self.comm = comm
        self.position = position  # where ``comm`` is within the current step
        self.plan = plan
        self.max_seq_len = model.max_seq_len
        self.prefill_chunk = prefill_chunk
        self.join_timeout_s = join_timeout_s
        n = plan.num_layers
        k = plan.private_layers
        self.first, self.shared, self.last = range(0, k), plan.shared_layers, range(n - k, n)
        self.kv_slots = kv_slots  # the sequences this (rank 0's) model holds at once
        self.seq = 0
        self.step = 0
        self._ring_members: tuple[tuple[bytes, str], ...] = ()

    @property
    def slots(self) -> int:
        """Sequences the cluster holds at once: the fewest KV slots of any node joined."""
        return min([self.kv_slots, *(p.kv_slots for p in dict(self.transport.peers).values())])

    def reset(self) -> None:
        self.seq += 1
        self.step = 0

    def logits(self, tokens: torch.Tensor, start_pos: int, slot: int = 0) -> torch.Tensor:
        return self._run(tokens, start_pos, slot, every_row=False)[0]  # [V]

    def rows_logits(self, tokens: torch.Tensor, start_pos: int, slot: int = 0) -> torch.Tensor:
        """Logits of every row [T, V] of one step (a speculative step's newest token and its
        draft; a later step that starts before their end overwrites the positions rejected)."""
        if tokens.numel() > self.prefill_chunk:
            raise ConfigError(f"{tokens.numel()} rows to verify exceed a step of "
                              f"{self.prefill_chunk}; lower --draft-tokens")
        if tokens.numel() <= kernels.MAX_BATCH_ROWS:  # each row bitwise a one-row step's
            return self.batch_logits(tokens, *one_sequence_rows(slot, start_pos, tokens))
        return self._run(tokens, start_pos, slot, every_row=True)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, start_pos: int, slot: int) -> None:
        """One step of a prompt's chunk (at most ``prefill_chunk`` tokens [C]) into ``slot``,
        without the head: a chunk before the prompt's last (continuous batching)."""
        self._in_steps(lambda: self._step(self.model.embed(tokens), [slot], [start_pos]))

    @torch.inference_mode()
    def batch_logits(self, tokens: torch.Tensor, slots: list[int], positions: list[int]
                     ) -> torch.Tensor:
        """A decode batch: tokens [B], each the newest of the sequence in ``slots[i]`` at
        ``positions[i]``, in one step -> logits [B, V], row i bitwise what a one-row step of
        that sequence gives."""
        def run() -> torch.Tensor:
            started = now()
            h = self._step(self.model.embed(tokens), slots, positions)  # [B, d]
            logits = self.model.head_rows(h)  # [B, V]
            RECORDER.add("step", self.step, started, now())
            return logits
        return self._in_steps(run)

    @torch.inference_mode()
    def _run(self, tokens: torch.Tensor, start_pos: int, slot: int, every_row: bool
             ) -> torch.Tensor:
        """tokens [T] at start_pos.. through the cluster, in steps of at most ``prefill_chunk``;
        -> the logits of the last row [1, V], or of every row of the last step [C, V]."""
        def run() -> torch.Tensor:
            h, started = None, now()
            for offset in range(0, tokens.numel(), self.prefill_chunk):
                if h is not None:  # a prefill chunk's step span ends here; the last one's
                    RECORDER.add("step", self.step, started, now())  # after the head
                    started = now()
                chunk = tokens[offset : offset + self.prefill_chunk]  # [C]
                h = self._step(self.model.embed(chunk), [slot], [start_pos + offset])
            assert h is not None, "logits() needs at least one token"
            logits = self.model.head(h if every_row else h[-1:])  # [C or 1, V]
            RECORDER.add("step", self.step, started, now())
            return logits
        return self._in_steps(run)

    def _in_steps(self, run: Callable[[], torch.Tensor | None]) -> Any:
        """``run()``'s steps with the cluster held: every worker joined, the ring linked; a
        failed step is aborted on every worker."""
        with self.transport.lock:
            self.transport.wait_for_workers(self.join_timeout_s)
            try:
                if isinstance(self.comm, RingAllreduce) and self.plan.n_ranks > 1:
                    self._link_ring(self.comm.link)
                return run()
            except ClusterError:
                self._abort()
                raise

    def _step(self, h: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor:
        """One step (edgetp.net.wire's ``step``): h [C, d] -> [C, d]."""
        self.step += 1
        h = self.model.forward_step(h, slots, starts, self.first)
        if self.plan.n_ranks > 1:
            self.position.begin(self.seq, self.step, 2 * len(self.shared))
            self.transport.broadcast("step", {"seq": self.seq, "step": self.step,
                                              "slots": slots, "starts": starts}, [h])
        h = self.model.forward_step(h, slots, starts, self.shared)
        return self.model.forward_step(h, slots, starts, self.last)

    def collect_stats(self, timeout_s: float | None = None) -> dict[int, tuple[dict, list]]:
        """Every worker's counters and spans since the last collection, by rank."""
        timeout_s = self.join_timeout_s if timeout_s is None else timeout_s
        with self.transport.lock:
            self.transport.broadcast("collect", {"seq": self.seq})
            out: dict[int, tuple[dict, list]] = {}
            deadline = time.monotonic() + timeout_s
            while len(out) < self.plan.n_ranks - 1:
                got = self.transport.receive(max(0.0, deadline - time.monotonic()))
                if got is None:
                    missing = [r for r in self.transport.worker_ranks if r not in out]
                    raise ClusterError(f"ranks {missing} sent no statistics in {timeout_s:g} s")
                rank, message = got
                if message.op == "stats" and message.fields["seq"] == self.seq:
                    out[rank] = (message.fields["stats"], spans_from_tensor(message.tensors[0]))
            return out

    def _link_ring(self, link: RingLink) -> None:
        """Tell every worker its ring successor, whenever the membership changed."""
        peers = dict(self.transport.peers)
        members = tuple((peers[r].identity, peers[r].ring_address)
                        for r in self.transport.worker_ranks)
        if members == self._ring_members:
            return
        listeners = {0: RingPeer("", link.public_key, link.token)}  # "": as each worker sees it
        listeners.update({r: RingPeer(peers[r].ring_address, peers[r].public_key,
                                      peers[r].ring_token) for r in self.transport.worker_ranks})
        successor = successors(listeners)
        for rank in self.transport.worker_ranks:
            self.transport.send(rank, "link", link_fields(successor[rank]))
        link.connect(successor[0])
        self._ring_members = members

    def _abort(self) -> None:
        for rank in list(self.transport.peers):
            try:
                self.transport.send(rank, "abort", {"seq": self.seq})
            except ClusterError:
                pass


class Master:
    """Tokenize, run the engine, detokenize."""

    def __init__(self, tokenizer: Tokenizer, runner: Runner) -> None:
        self.tokenizer = tokenizer
        self.runner = runner
        self.engine = Engine(runner, tokenizer, tokenizer.eos_token_ids)

    def use_draft(self, draft: str | None, max_tokens: int = DEFAULT_DRAFT_TOKENS) -> None:
        """Decode speculatively from now on: ``draft`` is ``"lookup"`` (prompt lookup) or a
        small model's directory with this model's tokenizer, run whole in this process; None
        turns speculation off. ``max_tokens``: the most tokens a step drafts."""
        if draft is None:
            self.engine.speculation = None
            return
        check_draft_tokens(max_tokens)
        drafter = open_drafter(draft, self.tokenizer, self.max_seq_len,
                               self.model.config.vocab_size, self.model.dtype)
        self.engine.speculation = Speculation(drafter, max_tokens)

    @classmethod
    def local(
        cls, model_dir: str | Path, dtype: str = "float32", max_seq_len: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> Master:
        """A single-process master holding the whole model (and KV slots for ``max_batch``
        sequences decoding together)."""
        from edgetp.model.checkpoint import load_model
        from edgetp.parallel.linears import on_kernels

        keep_freed_memory()  # as a node without a memory budget (edgetp.core.allocator)
        model = on_kernels(load_model(model_dir, parse_dtype(dtype), max_seq_len))
        return cls(Tokenizer.from_dir(model_dir),
                   LocalRunner(model, kv_slots=check_max_batch(max_batch)))

    @classmethod
    def cluster(cls, shard_dir: str | Path, bind: str, dtype: str = "float32",
                max_seq_len: int | None = None, wire_dtype: str = "f32",
                timeout_s: float = 10.0, prefill_chunk: int = PREFILL_CHUNK,
                memory_budget: int | None = None, allreduce: str = "star",
                security: MasterSecurity | None = None,
                max_batch: int = DEFAULT_MAX_BATCH) -> Master:
        """The master of a cluster: loads rank 0's shard and listens for workers on ``bind``;
        it decodes up to ``max_batch`` sequences together (as many as every node holds)."""
        from edgetp.parallel.loader import load_rank
        from edgetp.shard.manifest import read_manifest

        manifest = read_manifest(shard_dir)
        if manifest.rank != 0:
            raise ShardError(f"{shard_dir} is rank {manifest.rank}'s shard; the master needs "
                             "rank-0 (it holds the embedding, the head and the tokenizer)")
        check_max_batch(max_batch)
        identity = NodeIdentity(0, manifest.fingerprint, manifest.plan.to_json(), manifest.dtype)
        transport = MasterTransport(bind, identity, manifest.plan.n_ranks, wire_dtype, timeout_s,
                                    security)
        try:
            position = StepPosition()
            comm = (SoloCommunicator() if manifest.plan.n_ranks == 1  # no allreduce at all
                    else _master_communicator(transport, allreduce, wire_dtype, timeout_s,
                                              position, security))
            hidden = manifest.model_config.hidden_size
            chunk = master_prefill_chunk(prefill_chunk, hidden)
            model = load_rank(shard_dir, comm, parse_dtype(dtype), max_seq_len,
                              memory_budget=memory_budget, prefill_chunk=chunk,
                              kv_slots=max_batch)
            runner = ClusterRunner(model, transport, comm, position, manifest.plan, chunk,
                                   timeout_s, max_batch)
            return cls(Tokenizer.from_dir(shard_dir), runner)
        except BaseException:
            transport.close()
            raise

    def set_spin(self, spin_s: float) -> None:
        """How long the allreduces watch the data links before they sleep (a local cluster
        turns it off when its nodes have more threads than the machine has cores)."""
        if self._cluster is not None:
            self._cluster.transport.spin_s = spin_s

    def close(self, shutdown_workers: bool = False, wait_s: float | None = None) -> bool:
        """Close the cluster's sockets (telling the workers to exit if ``shutdown_workers``).

        A request holds the cluster until its step ends; with ``wait_s``, give up after that
        long and return False, closing nothing (a stuck step must not hold up an exit).
        """
        if self._cluster is None:
            return True
        transport = self._cluster.transport
        if not transport.lock.acquire(timeout=-1 if wait_s is None else wait_s):
            return False
        try:
            transport.close(shutdown_workers)
        finally:
            transport.lock.release()
        return True

    # -- the cluster, as its callers see it (a local master is a cluster of one) ---------------

    @property
    def _cluster(self) -> ClusterRunner | None:
        return self.runner if isinstance(self.runner, ClusterRunner) else None

    @property
    def model(self) -> Transformer:
        """The model this process runs: the whole model, or rank 0's share of it."""
        return self.runner.model  # type: ignore[attr-defined, no-any-return]

    @property
    def max_seq_len(self) -> int:
        return int(self.runner.max_seq_len)

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens per step."""
        return int(self.runner.prefill_chunk)  # type: ignore[attr-defined]

    @property
    def batch_slots(self) -> int:
        """Sequences that decode together now: the KV slots every node holds, at most
        ``--max-batch``."""
        return int(self.runner.slots)  # type: ignore[attr-defined]

    @property
    def n_ranks(self) -> int:
        return 1 if self._cluster is None else self._cluster.plan.n_ranks

    @property
    def plan(self) -> ShardPlan | None:
        """The shard plan of a cluster; None for a local master."""
        return None if self._cluster is None else self._cluster.plan

    @property
    def address(self) -> str | None:
        """The address workers join (None for a local master)."""
        return None if self._cluster is None else self._cluster.transport.address

    @property
    def traffic(self) -> Traffic | None:
        """Bytes and messages the master has exchanged with its workers (None: local)."""
        return None if self._cluster is None else self._cluster.transport.traffic

    def missing_ranks(self) -> list[int]:
        """Worker ranks that have not joined (or have been lost)."""
        return [] if self._cluster is None else list(self._cluster.transport.missing_ranks())

    def failing_ranks(self) -> dict[int, str]:
        """Ranks whose weights fail to read (a streamed file deleted, truncated, unreadable),
        with the reason: what the workers reported, and this process's own window, which is
        read again on each call (asking is retrying; a request retries too)."""
        failing = {} if self._cluster is None else self._cluster.transport.failing_ranks()
        window = getattr(self.model, "window", None)
        if window is not None and (failure := window.failure) is not None:
            failing[0] = failure
            window.retry()
        return dict(sorted(failing.items()))

    def wait_for_workers(self, timeout_s: float | None = None) -> None:
        """Block until every worker has joined; ClusterError after ``timeout_s``."""
        if self._cluster is not None:
            self._cluster.transport.wait_for_workers(timeout_s)

    def worker_pids(self) -> dict[int, int]:
        """Rank -> the process id each joined worker reported."""
        if self._cluster is None:
            return {}
        peers = dict(self._cluster.transport.peers)  # the heartbeat thread may change it
        return {rank: peer.pid for rank, peer in peers.items()}

    def worker_hosts(self) -> dict[int, str]:
        """Rank -> the host name each joined worker reported."""
        if self._cluster is None:
            return {}
        return {rank: peer.host for rank, peer in dict(self._cluster.transport.peers).items()}

    def collect_stats(self, timeout_s: float | None = None) -> dict[int, tuple[dict, list]]:
        """Each worker's facts and spans since the last call (empty for a local master); a
        ClusterError if one sends nothing within ``timeout_s`` (default: the cluster's)."""
        return {} if self._cluster is None else self._cluster.collect_stats(timeout_s)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if not prompt.chat:
            return self.tokenizer.encode(prompt.text)
        messages = [] if prompt.system is None else [{"role": "system", "content": prompt.system}]
        messages.append({"role": "user", "content": prompt.text})
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True)
        assert isinstance(ids, list)
        return ids

    def generate(
        self,
        prompt: Prompt,
        sampling: SamplingConfig,
        gen: GenerationConfig,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        return self.engine.generate(self.encode_prompt(prompt), sampling, gen, on_text)
