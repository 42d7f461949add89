"""Speculative decoding on the master: a drafter proposes K tokens, one step verifies them all.

Each step feeds the cluster ``[last, d_1 .. d_K]`` as K + 1 rows (one round of allreduces,
the KV caches written at K + 1 positions) and gets the logits of every row back on the master,
which keeps the accepted prefix and one token more (:func:`edgetp.model.speculative.verify`).
The rejected positions need no undoing: the next step starts at the first position after the
accepted tokens and overwrites them, on every rank (a position reset, no copy), and nothing
reads a cache beyond the position being computed.

K adapts (:class:`DraftLength`): it grows while whole drafts are kept and shrinks on each
rejection; when drafts keep failing, drafting rests for a while (a step that rejects its draft
costs its rows' compute and the drafter's time for nothing), then tries again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from edgetp.core.errors import ConfigError
from edgetp.model.drafting import Drafter, LookupDrafter, ModelDrafter, tokenizer_mismatch
from edgetp.model.sampling import Sampler
from edgetp.model.speculative import verify
from edgetp.model.tokenizer import Tokenizer

DEFAULT_DRAFT_TOKENS = 8
MAX_DRAFT_TOKENS = 64
START_TOKENS = 4  # K of a sequence's first step (at most the maximum)
RATE_MEMORY = 0.7  # the acceptance rate's running mean keeps this much of its past
REST_BELOW = 0.15  # ... and drafting rests when it falls below this
FIRST_REST = 4  # steps without a draft after the first failing streak; doubles up to MAX_REST
MAX_REST = 64


class DraftLength:
    """How many tokens to draft next, from how many of the previous drafts were kept."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.k = min(START_TOKENS, max_tokens)
        self.rate = 1.0  # running mean of the kept fraction
        self.resting = 0  # steps left without a draft
        self.rest = FIRST_REST

    def next(self) -> int:
        if self.resting > 0:
            self.resting -= 1
            return 0
        return self.k

    def update(self, proposed: int, kept: int) -> None:
        if proposed == 0:
            return
        self.rate = RATE_MEMORY * self.rate + (1 - RATE_MEMORY) * kept / proposed
        self.k = min(self.max_tokens, self.k + 2) if kept == proposed else max(1, self.k - 1)
        if self.rate < REST_BELOW:
            self.resting, self.rest = self.rest, min(MAX_REST, 2 * self.rest)
            self.rate = 2 * REST_BELOW  # after the rest: two misses in a row rest again
        elif kept > 0:
            self.rest = FIRST_REST


@dataclass
class SpeculationStats:
    """What one generation's speculation did."""

    steps: int = 0  # decode steps (each one round of allreduces)
    drafted: int = 0  # tokens proposed
    accepted: int = 0  # ... and kept

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def to_json(self) -> dict[str, float | int]:
        return {"decode_steps": self.steps, "drafted_tokens": self.drafted,
                "accepted_tokens": self.accepted, "acceptance_rate": round(self.acceptance, 4)}


@dataclass(frozen=True)
class Speculation:
    """A drafter and the most tokens a step may draft (``--draft``, ``--draft-tokens``)."""

    drafter: Drafter
    max_tokens: int = DEFAULT_DRAFT_TOKENS

    def __post_init__(self) -> None:
        check_draft_tokens(self.max_tokens)


def check_draft_tokens(max_tokens: int) -> None:
    if not 1 <= max_tokens <= MAX_DRAFT_TOKENS:
        raise ConfigError(f"--draft-tokens must be in 1..{MAX_DRAFT_TOKENS}, got {max_tokens}")


class RowsRunner(Protocol):
    """What speculation needs of a runner (:class:`edgetp.runtime.engine.Runner`)."""

    max_seq_len: int

    def rows_logits(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """tokens: [T] int64 at positions start_pos.. -> logits of every row [T, V]."""


class SpeculativeSteps:
    """One generation's decode steps with drafts (the engine's :class:`DecodeSteps`)."""

    def __init__(self, speculation: Speculation, runner: RowsRunner, sampler: Sampler) -> None:
        self.drafter = speculation.drafter
        self.length = DraftLength(speculation.max_tokens)
        self.runner = runner
        self.sampler = sampler
        self._stats = SpeculationStats()
        self.drafter.reset()

    @property
    def stats(self) -> SpeculationStats:
        return self._stats

    def next_tokens(self, history: Sequence[int], position: int, room: int) -> list[int]:
        """The tokens after ``history`` (its last token sits at ``position``, not yet in the
        cache); ``room``: at most this many tokens are still wanted."""
        k = min(self.length.next(), room - 1, self.runner.max_seq_len - position - 1)
        draft = self.drafter.propose(history, k, self.sampler) if k > 0 else None
        tokens = [history[-1], *(draft.tokens if draft else [])]
        rows = self.runner.rows_logits(torch.tensor(tokens, dtype=torch.int64), position)
        self._stats.steps += 1
        if draft is None or not draft.tokens:
            return [self.sampler(rows[0], history)]
        out = verify(self.sampler, rows, draft, history)
        kept = len(out) - 1
        self._stats.drafted += len(draft.tokens)
        self._stats.accepted += kept
        self.length.update(len(draft.tokens), kept)
        return out


def draft_model_dir(spec: str) -> Path | None:
    """The draft model's directory ``--draft`` names (None: ``lookup``), checked before a
    cluster starts."""
    if spec == "lookup":
        return None
    model_dir = Path(spec)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--draft {spec}: neither 'lookup' nor a model directory with a "
                          "config.json")
    return model_dir


def open_drafter(spec: str, tokenizer: Tokenizer, max_seq_len: int, vocab_size: int,
                 dtype: torch.dtype = torch.float32) -> Drafter:
    """``--draft lookup`` or ``--draft MODEL_DIR`` (a small model with the same tokenizer,
    loaded whole into this process)."""
    model_dir = draft_model_dir(spec)
    if model_dir is None:
        return LookupDrafter()
    from edgetp.model.checkpoint import load_model

    mismatch = tokenizer_mismatch(tokenizer, Tokenizer.from_dir(model_dir))
    if mismatch is not None:
        raise ConfigError(f"--draft {spec}: its tokenizer is not the model's: {mismatch}; a "
                          "draft model must share the model's tokenizer")
    model = load_model(model_dir, dtype, max_seq_len)
    return ModelDrafter(model, vocab_size)
