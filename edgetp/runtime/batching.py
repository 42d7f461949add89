"""Continuous batching: several sequences decode together, one row each per step.

:class:`BatchScheduler` holds up to ``runner.slots`` sequences, each in a KV slot of its own.
Every :meth:`~BatchScheduler.round` is at most two steps of the cluster:

1. one prompt chunk of the sequence that joined first among those still reading their prompt
   (chunked prefill: a long prompt holds the others up for one chunk per round, never for the
   whole prompt); after its last chunk the sequence samples its first token;
2. one decode step for every sequence that has a token to feed: B tokens in, B rows of
   logits out, in one round of allreduces. With speculative decoding (``--draft``) each
   sequence may add the tokens its drafter proposes, as rows of its own slot at the next
   positions (at most :data:`~edgetp.kernels.native.MAX_BATCH_ROWS` rows in all, the first
   sequences first); its drafts are verified as :mod:`edgetp.runtime.speculation` does alone.

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
from edgetp.kernels import native as kernels
from edgetp.model.drafting import Drafter
from edgetp.model.sampling import Sampler
from edgetp.model.speculative import Draft, verify
from edgetp.runtime.engine import (
    BatchRunner,
    GenerationResult,
    TextCodec,
    TextStream,
    check_prompt,
    limit_reason,
)
from edgetp.runtime.speculation import (
    Acceptance,
    DraftLength,
    Speculation,
    SpeculationStats,
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
    drafting: SequenceDrafts | None = None  # with speculative decoding

    @property
    def position(self) -> int:
        """Where the pending token goes: the tokens already in the cache."""
        return len(self.prompt) + len(self.generated) - 1


@dataclass
class SequenceDrafts:
    """A sequence's speculation: its drafter, how many tokens it drafts next, what it did."""

    drafter: Drafter
    length: DraftLength
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    draft: Draft | None = None  # this step's


@dataclass(frozen=True)
class Ended:
    """A sequence that left the batch: its result, or the error that ended it."""

    sequence: BatchedSequence
    result: GenerationResult | None = None
    error: BaseException | None = None


class BatchScheduler:
    """Sequences of up to ``runner.slots`` requests, advanced together round by round."""

    def __init__(self, runner: BatchRunner, codec: TextCodec, eos_ids: Sequence[int],
                 speculation: Speculation | None = None) -> None:
        self.runner = runner
        self.codec = codec
        self.eos_ids = frozenset(eos_ids)
        self.speculation = speculation
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
                                   Sampler(sampling), TextStream(self.codec, gen.stop_strings),
                                   drafting=self._drafts_for(free[0]))
        self.active.append(sequence)
        return sequence

    def _drafts_for(self, slot: int) -> SequenceDrafts | None:
        """A new sequence's speculation: the slot's drafter, the acceptance learned so far as
        its prior, the step costs shared."""
        spec = self.speculation
        if spec is None:
            return None
        drafter = spec.drafter_for(slot)
        drafter.reset()
        prior = Acceptance()
        prior.kept, prior.rejected = spec.acceptance.kept, spec.acceptance.rejected
        return SequenceDrafts(drafter, DraftLength(spec.max_tokens, spec.costs, prior))

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
        """One decode step of ``batch``: every sequence's pending token (and drafted tokens)
        in, its next tokens out."""
        started = time.perf_counter()
        drafted = self._draft(batch)
        tokens: list[int] = []
        slots: list[int] = []
        positions: list[int] = []
        counts: list[int] = []  # each sequence's rows: its pending token and its drafts
        for sequence in batch:
            assert sequence.pending is not None
            row_tokens = [sequence.pending, *self._draft_tokens(sequence)]
            tokens += row_tokens
            slots += [sequence.slot] * len(row_tokens)
            positions += range(sequence.position, sequence.position + len(row_tokens))
            counts.append(len(row_tokens))
        logits = self.runner.batch_logits(torch.tensor(tokens, dtype=torch.int64), slots,
                                          positions)  # [R, V]: a sequence's rows together
        now = time.perf_counter()
        ended: list[Ended] = []
        row = 0
        for sequence, count in zip(batch, counts, strict=True):
            out = self._next_tokens(sequence, logits[row : row + count])
            row += count
            per_token_ms = (now - sequence.last_token_at) * 1000 / len(out)
            sequence.last_token_at = now
            ended += self._take_all(sequence, out, per_token_ms)
        self._record_cost(now - started, drafted)
        return ended

    def _draft(self, batch: list[BatchedSequence]) -> int:
        """Each drafting sequence's proposal for this step, within the rows left after one
        per sequence (the batched products' most); how many tokens were drafted."""
        room = kernels.MAX_BATCH_ROWS - len(batch)
        drafted = 0
        for sequence in batch:
            drafts = sequence.drafting
            if drafts is None:
                continue
            wanted = sequence.gen.max_new_tokens - len(sequence.generated) - 1
            k = min(drafts.length.next(), room, wanted,
                    self.runner.max_seq_len - sequence.position - 1)
            history = sequence.prompt + sequence.generated
            drafts.draft = drafts.drafter.propose(history, k, sequence.sampler) if k > 0 else None
            count = len(self._draft_tokens(sequence))
            room -= count
            drafted += count
        return drafted

    @staticmethod
    def _draft_tokens(sequence: BatchedSequence) -> list[int]:
        drafts = sequence.drafting
        return [] if drafts is None or drafts.draft is None else drafts.draft.tokens

    def _next_tokens(self, sequence: BatchedSequence, rows: torch.Tensor) -> list[int]:
        """The tokens a sequence's rows [1 + K, V] give: its next token, or the drafted ones
        kept and the one after (the rejection rule when sampling)."""
        history = sequence.prompt + sequence.generated
        drafts = sequence.drafting
        if drafts is not None:
            drafts.stats.steps += 1
        if drafts is None or drafts.draft is None or not drafts.draft.tokens:
            return [sequence.sampler(rows[0], history)]
        draft, drafts.draft = drafts.draft, None
        out = verify(sequence.sampler, rows, draft, history)
        drafts.stats.drafted += len(draft.tokens)
        drafts.stats.accepted += len(out) - 1
        drafts.length.update(len(draft.tokens), len(out) - 1)
        return out

    def _record_cost(self, seconds: float, drafted: int) -> None:
        """What this step cost, for the draft lengths to weigh (speculation only)."""
        if self.speculation is None:
            return
        if drafted:
            self.speculation.costs.drafted(seconds, drafted)
        else:
            self.speculation.costs.plain(seconds)

    def _take_all(self, sequence: BatchedSequence, tokens: list[int], per_token_ms: float
                  ) -> list[Ended]:
        """:meth:`_take` each of a step's tokens until the sequence ends (each counts its
        share of the step's time)."""
        for token in tokens:
            sequence.decode_ms.append(per_token_ms)
            ended = self._take(sequence, token)
            if ended:
                return ended
        return []

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
        stats = None if sequence.drafting is None else sequence.drafting.stats
        return GenerationResult(sequence.generated, sequence.stream.text, len(sequence.prompt),
                                reason, sequence.ttft_ms, list(sequence.decode_ms), stats)
