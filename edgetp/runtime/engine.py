"""The prefill/decode loop: runs a model (local or distributed) and stops when it should.

The engine sees the model through :class:`Runner`: something that turns the tokens at
``start_pos`` into the logits of the last position. A single process uses
:class:`LocalRunner`; the master of a cluster provides a runner that drives its workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.core.errors import ConfigError
from edgetp.core.limits import PREFILL_CHUNK
from edgetp.kernels import native as kernels
from edgetp.model.llama import Transformer
from edgetp.model.sampling import Sampler
from edgetp.runtime.speculation import Speculation, SpeculationStats, SpeculativeSteps

REPLACEMENT_CHAR = "\ufffd"


class Runner(Protocol):
    """What the engine needs of a model."""

    max_seq_len: int

    def reset(self) -> None:
        """Start a new sequence (the KV cache is overwritten from position 0)."""

    def logits(self, tokens: torch.Tensor, start_pos: int, slot: int = 0) -> torch.Tensor:
        """tokens: [T] int64 at positions start_pos.. of the sequence in KV slot ``slot`` ->
        logits of the last position [V]."""

    def rows_logits(self, tokens: torch.Tensor, start_pos: int, slot: int = 0) -> torch.Tensor:
        """tokens: [T] int64 at positions start_pos.. -> logits of every row [T, V] (a
        speculative step: the newest token and a draft, verified in one step)."""


class BatchRunner(Runner, Protocol):
    """What continuous batching (edgetp.runtime.batching) needs of a model besides."""

    prefill_chunk: int

    @property
    def slots(self) -> int:
        """Sequences whose keys and values it holds at once (KV slots 0..slots-1)."""

    def prefill(self, tokens: torch.Tensor, start_pos: int, slot: int) -> None:
        """One prompt chunk [C] (C <= prefill_chunk) into ``slot``, without logits."""

    def batch_logits(self, tokens: torch.Tensor, slots: list[int], positions: list[int]
                     ) -> torch.Tensor:
        """A decode batch: tokens [B] at ``positions`` in ``slots`` -> logits [B, V], each row
        bitwise the logits that sequence gets alone."""


class TextCodec(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class LocalRunner:
    """A whole model in this process; prompts are fed in chunks of ``prefill_chunk`` tokens.
    ``kv_slots``: the sequences it holds at once (each slot allocated when first used)."""

    def __init__(self, model: Transformer, prefill_chunk: int = PREFILL_CHUNK,
                 kv_slots: int = 1) -> None:
        self.model = model
        self.max_seq_len = model.max_seq_len
        self.prefill_chunk = prefill_chunk
        self.kv_slots = kv_slots

    @property
    def slots(self) -> int:
        return self.kv_slots

    def reset(self) -> None:
        return None  # positions restart at 0; stale cache entries are never attended to

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor, start_pos: int, slot: int = 0) -> torch.Tensor:
        return self.model.head(self._last_chunk(tokens, start_pos, slot)[-1:])[0]  # [V]

    @torch.inference_mode()
    def rows_logits(self, tokens: torch.Tensor, start_pos: int, slot: int = 0) -> torch.Tensor:
        if tokens.numel() > self.prefill_chunk:
            raise ConfigError(f"{tokens.numel()} rows to verify exceed a step of "
                              f"{self.prefill_chunk}")
        if tokens.numel() <= kernels.MAX_BATCH_ROWS:  # each row bitwise a one-row step's
            return self.batch_logits(tokens, *one_sequence_rows(slot, start_pos, tokens))
        return self.model.head(self._last_chunk(tokens, start_pos, slot))  # [T, V]

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, start_pos: int, slot: int) -> None:
        self.model.forward_layers(self.model.embed(tokens), start_pos, slot=slot)

    @torch.inference_mode()
    def batch_logits(self, tokens: torch.Tensor, slots: list[int], positions: list[int]
                     ) -> torch.Tensor:
        h = self.model.forward_rows(self.model.embed(tokens), slots, positions)  # [B, d]
        return self.model.head_rows(h)  # [B, V]

    def _last_chunk(self, tokens: torch.Tensor, start_pos: int, slot: int) -> torch.Tensor:
        """Run ``tokens`` [T] chunk by chunk; -> the last chunk's hidden states [C, d]."""
        h = None
        for offset in range(0, tokens.numel(), self.prefill_chunk):
            chunk = tokens[offset : offset + self.prefill_chunk]  # [C]
            h = self.model.forward_layers(self.model.embed(chunk), start_pos + offset,
                                          slot=slot)
        assert h is not None, "logits() needs at least one token"
        return h


def one_sequence_rows(slot: int, start_pos: int, tokens: torch.Tensor
                      ) -> tuple[list[int], list[int]]:
    """The slots and positions of a decode batch holding one sequence's ``tokens`` [T] at
    start_pos..: a speculative step verified as T one-row steps in one, bitwise theirs."""
    return [slot] * tokens.numel(), list(range(start_pos, start_pos + tokens.numel()))


@dataclass
class GenerationResult:
    """What one generation produced and how long it took."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" | "length" | "context"
    ttft_ms: float
    decode_ms: list[float] = field(default_factory=list)  # one entry per decoded token
    speculation: SpeculationStats | None = None  # with a drafter: its steps and acceptance

    @property
    def ms_per_token(self) -> float:
        return sum(self.decode_ms) / len(self.decode_ms) if self.decode_ms else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "token_ids": self.token_ids,
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": len(self.token_ids),
            "finish_reason": self.finish_reason,
            "ttft_ms": round(self.ttft_ms, 3),
            "ms_per_token": round(self.ms_per_token, 3),
            **({} if self.speculation is None else {"speculation": self.speculation.to_json()}),
        }


class TextStream:
    """Incremental text of a growing id list, holding back what may still change.

    Held back: a trailing partial UTF-8 character (decoded as U+FFFD) and any suffix that is
    the beginning of a stop string.
    """

    def __init__(self, codec: TextCodec, stop_strings: Sequence[str]) -> None:
        self.codec = codec
        self.stop_strings = [s for s in stop_strings if s]
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def update(self, ids: list[int]) -> str:
        """Decode ``ids`` (all generated so far) and return the newly safe text."""
        self.text = self.codec.decode(ids)
        cut = self._stop_index()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._emit(len(self.text))
        safe = len(self.text)
        if self.text.endswith(REPLACEMENT_CHAR):
            safe = len(self.text.rstrip(REPLACEMENT_CHAR))
        safe -= self._stop_prefix_len(self.text[:safe])
        return self._emit(max(safe, self.emitted))

    def finish(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return piece

    def _stop_index(self) -> int | None:
        hits = [self.text.find(s) for s in self.stop_strings]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        longest = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class DecodeSteps(Protocol):
    """How one generation decodes after its prompt: a token a step, or drafts verified."""

    @property
    def stats(self) -> SpeculationStats | None:
        """What speculation did (None: there was none)."""

    def next_tokens(self, history: Sequence[int], position: int, room: int) -> list[int]:
        """The next tokens (at least one) after ``history``, whose last token sits at
        ``position`` and is not in the cache yet; ``room``: at most this many are wanted."""


class PlainSteps:
    """A token a step: the newest token in, the next one out."""

    def __init__(self, runner: Runner, sampler: Sampler) -> None:
        self.runner = runner
        self.sampler = sampler

    @property
    def stats(self) -> SpeculationStats | None:
        return None

    def next_tokens(self, history: Sequence[int], position: int, room: int) -> list[int]:
        logits = self.runner.logits(torch.tensor(history[-1:], dtype=torch.int64), position)
        return [self.sampler(logits, history)]


class Engine:
    """Generates from a prompt's token ids with a :class:`Runner` and a text codec."""

    def __init__(self, runner: Runner, codec: TextCodec, eos_ids: Sequence[int],
                 speculation: Speculation | None = None) -> None:
        self.runner = runner
        self.codec = codec
        self.eos_ids = frozenset(eos_ids)
        self.speculation = speculation  # draft and verify several tokens a step, or not

    def generate(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingConfig,
        gen: GenerationConfig,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        check_prompt(prompt_ids, self.runner.max_seq_len)
        sampler, stream = Sampler(sampling), TextStream(self.codec, gen.stop_strings)
        emit = on_text or (lambda _piece: None)
        self.runner.reset()
        steps = self._decode_steps(sampler)
        prompt = list(prompt_ids)
        start = time.perf_counter()
        logits = self.runner.logits(torch.tensor(prompt, dtype=torch.int64), 0)
        pending = [sampler(logits, prompt)]
        tick = time.perf_counter()
        ttft_ms = (tick - start) * 1000
        generated: list[int] = []
        decode_ms: list[float] = []
        sampled = 0  # tokens drawn (an EOS that ends generation included)
        while True:
            for token in pending:
                sampled += 1
                reason = "eos" if gen.stop_on_eos and token in self.eos_ids else None
                if reason is None:
                    generated.append(token)
                    emit(stream.update(generated))
                    reason = limit_reason(stream, gen, len(generated),
                                          len(prompt) + len(generated) - 1,
                                          self.runner.max_seq_len)
                if reason is not None:
                    emit(stream.finish())
                    return GenerationResult(generated, stream.text, len(prompt), reason, ttft_ms,
                                            decode_ms[:sampled - 1], steps.stats)
            history = prompt + generated
            pending = steps.next_tokens(history, len(history) - 1,
                                        gen.max_new_tokens - len(generated))
            tick, last = time.perf_counter(), tick  # a step's time: sampling and text included
            decode_ms += [(tick - last) * 1000 / len(pending)] * len(pending)

    def _decode_steps(self, sampler: Sampler) -> DecodeSteps:
        if self.speculation is None:
            return PlainSteps(self.runner, sampler)
        return SpeculativeSteps(self.speculation, self.runner, sampler)



def check_prompt(prompt_ids: Sequence[int], max_seq_len: int) -> None:
    """A ConfigError unless the prompt has a token and leaves room for one more."""
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give at least one token")
    if len(prompt_ids) >= max_seq_len:
        raise ConfigError(
            f"prompt of {len(prompt_ids)} tokens leaves no room in a context of "
            f"{max_seq_len}; raise --max-seq-len or shorten the prompt"
        )


def limit_reason(stream: TextStream, gen: GenerationConfig, n_generated: int, position: int,
                 max_seq_len: int) -> str | None:
    """Why generation ends after the token at ``position`` (a stop string, a limit), or None
    to go on."""
    if stream.stopped:
        return "stop"
    if n_generated >= gen.max_new_tokens:
        return "length"
    if position >= max_seq_len:
        return "context"
    return None
