"""Continuous batching: several sequences decode together, one row each per step.

:class:`BatchScheduler` holds up to ``runner.slots`` sequences, each in a KV slot of its own.
Every :meth:`~BatchScheduler.round` is at most two steps of the cluster:

1. one prompt chunk of the sequence that joined first among those still reading their prompt
   (chunked prefill: a long prompt holds the others up for one chunk per round, never for the
   whole prompt); after its last chunk the sequence samples its first token;
2. one decode step for every sequence that has a token to feed: B tokens in, B rows of
   logits out, in one round of allreduces.

Sequences join (:meth:`~BatchScheduler.admit`) and leave (finished, failed, :meth:`drop`)
between rounds. A sequence's tokens are the ones it gets alone: its prompt is cut into the
same chunks as :class:`~edgetp.runtime.engine.Engine` cuts it, and every row of a decode
batch is computed bitwise as a one-row step of that sequence (``Transformer.forward_rows``).
Workers see hidden states only: slots and positions, never tokens or sampling settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.sampling import Sampler
from edgetp.runtime.engine import (
    BatchRunner,
    GenerationResult,
    TextCodec,
    TextStream,
    check_prompt,
    limit_reason,
)


@dataclass
class BatchedSequence:
    """One sequence in the batch: its request, KV slot, sampler and what it has produced."""

    prompt: list[int]
    sampling: SamplingConfig
    gen: GenerationConfig
    on_text: Callable[[str], None]
    slot: int
    sampler: Sampler
    stream: TextStream
    joined_at: float = field(default_factory=time.perf_counter)
    prefilled: int = 0  # prompt tokens in the cache
    pending: int | None = None  # the sampled token not yet in the cache (None: prefilling)
    generated: list[int] = field(default_factory=list)
    ttft_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)
    last_token_at: float = 0.0

    @property
    def position(self) -> int:
        """Where the pending token goes: the tokens already in the cache."""
        return len(self.prompt) + len(self.generated) - 1


@dataclass(frozen=True)
class Ended:
    """A sequence that left the batch: its result, or the error that ended it."""

    sequence: BatchedSequence
    result: GenerationResult | None = None
    error: BaseException | None = None


class BatchScheduler:
    """Sequences of up to ``runner.slots`` requests, advanced together round by round."""

    def __init__(self, runner: BatchRunner, codec: TextCodec, eos_ids: Sequence[int]) -> None:
        self.runner = runner
        self.codec = codec
        self.eos_ids = frozenset(eos_ids)
        self.active: list[BatchedSequence] = []

    @property
    def capacity(self) -> int:
        """Sequences the batch can hold now (the KV slots of every node)."""
        return int(self.runner.slots)

    def free_slots(self) -> int:
        return max(0, self.capacity - len(self.active))

    def admit(self, prompt_ids: Sequence[int], sampling: SamplingConfig, gen: GenerationConfig,
              on_text: Callable[[str], None]) -> BatchedSequence:
        """Add a request to the batch (a ConfigError if its prompt cannot run, a RuntimeError
        if no slot is free); its prompt is read from the next round on."""
        check_prompt(prompt_ids, self.runner.max_seq_len)
        taken = {s.slot for s in self.active}
        free = [slot for slot in range(self.capacity) if slot not in taken]
        if not free:
            raise RuntimeError(f"all {self.capacity} KV slots are in use")
        sequence = BatchedSequence(list(prompt_ids), sampling, gen, on_text, free[0],
                                   Sampler(sampling), TextStream(self.codec, gen.stop_strings))
        self.active.append(sequence)
        return sequence

    def drop(self, sequence: BatchedSequence) -> None:
        """Take ``sequence`` out of the batch (its client is gone); its slot is free at once."""
        if sequence in self.active:
            self.active.remove(sequence)

    def round(self) -> list[Ended]:
        """One prompt chunk (if a prompt is being read) and one decode step (if a sequence
        decodes); the sequences that ended in it. A failing step (a ClusterError, ...) raises:
        every sequence in the batch is then lost."""
        ended: list[Ended] = []
        reading = [s for s in self.active if s.pending is None]
        if reading:
            ended += self._prefill_chunk(reading[0])
        decoding = [s for s in self.active if s.pending is not None and s not in reading[:1]]
        if decoding:
            ended += self._decode(decoding)
        for end in ended:
            self.drop(end.sequence)
        return ended

    def _prefill_chunk(self, sequence: BatchedSequence) -> list[Ended]:
        """The next chunk of ``sequence``'s prompt; its first token after the last chunk."""
        chunk_size, start = self.runner.prefill_chunk, sequence.prefilled
        chunk = torch.tensor(sequence.prompt[start : start + chunk_size], dtype=torch.int64)
        sequence.prefilled += chunk.numel()
        if sequence.prefilled < len(sequence.prompt):
            self.runner.prefill(chunk, start, sequence.slot)
            return []
        logits = self.runner.logits(chunk, start, sequence.slot)  # [V]
        sequence.last_token_at = time.perf_counter()
        sequence.ttft_ms = (sequence.last_token_at - sequence.joined_at) * 1000
        return self._take(sequence, sequence.sampler(logits, sequence.prompt))

    def _decode(self, batch: list[BatchedSequence]) -> list[Ended]:
        """One decode step of ``batch``: every sequence's pending token in, its next out."""
        tokens = torch.tensor([s.pending for s in batch], dtype=torch.int64)  # [B]
        logits = self.runner.batch_logits(tokens, [s.slot for s in batch],
                                          [s.position for s in batch])  # [B, V]
        now = time.perf_counter()
        ended: list[Ended] = []
        for row, sequence in enumerate(batch):
            sequence.decode_ms.append((now - sequence.last_token_at) * 1000)
            sequence.last_token_at = now
            history = sequence.prompt + sequence.generated
            ended += self._take(sequence, sequence.sampler(logits[row], history))
        return ended

    def _take(self, sequence: BatchedSequence, token: int) -> list[Ended]:
        """``token`` was sampled for ``sequence``: emit its text; an Ended if it stops here."""
        try:
            reason = "eos" if sequence.gen.stop_on_eos and token in self.eos_ids else None
            if reason is None:
                sequence.generated.append(token)
                sequence.on_text(sequence.stream.update(sequence.generated))
                reason = limit_reason(sequence.stream, sequence.gen, len(sequence.generated),
                                      sequence.position, self.runner.max_seq_len)
            if reason is None:
                sequence.pending = token
                return []
            sequence.on_text(sequence.stream.finish())
        except Exception as exc:  # noqa: BLE001 - the callback's failure ends this sequence only
            return [Ended(sequence, error=exc)]
        return [Ended(sequence, result=self._result(sequence, reason))]

    def _result(self, sequence: BatchedSequence, reason: str) -> GenerationResult:
        """What ``sequence`` produced; decode_ms has one entry per decode step it took (an EOS
        that ended it included, as :class:`~edgetp.runtime.engine.Engine` counts)."""
        return GenerationResult(sequence.generated, sequence.stream.text, len(sequence.prompt),
                                reason, sequence.ttft_ms, list(sequence.decode_ms))
