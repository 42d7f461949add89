"""Speculative decoding on the master: a drafter proposes K tokens, one step verifies them all.

Each step feeds the cluster ``[last, d_1 .. d_K]`` as K + 1 rows (one round of allreduces,
the KV caches written at K + 1 positions) and gets the logits of every row back on the master,
which keeps the accepted prefix and one token more (:func:`edgetp.model.speculative.verify`).
The rejected positions need no undoing: the next step starts at the first position after the
accepted tokens and overwrites them, on every rank (a position reset, no copy), and nothing
reads a cache beyond the position being computed.

K adapts (:class:`DraftLength`): to the acceptance rate of drafted tokens and to what steps
cost here (:class:`StepCosts`: a plain step, and what each drafted token adds, measured), so
that it maximises the expected tokens per second. On a slow link a step's cost hardly depends
on its rows and K grows; where rows cost compute and drafts are rejected, drafting rests (a
rejected draft costs its rows and the drafter's time for nothing), then tries again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from edgetp.core.errors import ConfigError
from edgetp.model.drafting import Drafter, LookupDrafter, ModelDrafter, tokenizer_mismatch
from edgetp.model.sampling import Sampler
from edgetp.model.speculative import verify
from edgetp.model.tokenizer import Tokenizer

# a step of the newest token and 7 drafted is 8 rows: the most the batched products take, so
# each row's logits are bitwise a one-row step's (greedy output the same by construction)
DEFAULT_DRAFT_TOKENS = 7
MAX_DRAFT_TOKENS = 64
START_TOKENS = 4  # K of the first draft (at most the maximum), before the costs are known
MEMORY = 0.8  # running means and counts keep this much of their past at each step
MIN_GAIN = 1.03  # draft when the expected tokens/s beat plain steps' by at least this
FIRST_REST = 4  # steps without a draft when drafting does not pay; doubles up to MAX_REST
MAX_REST = 64
MAX_ACCEPTANCE = 0.99  # an estimate of 1 would promise endless drafts


def running_mean(old: float | None, new: float) -> float:
    return new if old is None else MEMORY * old + (1 - MEMORY) * new


class StepCosts:
    """What steps take on this cluster, as running means: a plain step (one row), and what
    each drafted token adds to a step (its row on every rank, the drafter's time)."""

    def __init__(self) -> None:
        self.plain_s: float | None = None
        self.per_draft_s: float | None = None

    def plain(self, seconds: float) -> None:
        self.plain_s = running_mean(self.plain_s, seconds)

    def drafted(self, seconds: float, proposed: int) -> None:
        if self.plain_s is not None:
            extra = max(0.0, seconds - self.plain_s) / proposed
            self.per_draft_s = running_mean(self.per_draft_s, extra)


class Acceptance:
    """How often drafted tokens are kept: decayed counts of kept tokens and of rejections
    (a step that keeps j of K drafted tokens saw j kept and, if j < K, one rejected). The
    prior, before any draft: one of each (a = 0.5)."""

    def __init__(self) -> None:
        self.kept, self.rejected = 1.0, 1.0

    @property
    def rate(self) -> float:
        """The estimated probability that a drafted token is kept (given its predecessors)."""
        return self.kept / (self.kept + self.rejected)

    def update(self, proposed: int, kept: int) -> None:
        self.kept = MEMORY * self.kept + kept
        self.rejected = MEMORY * self.rejected + (1 if kept < proposed else 0)


class DraftLength:
    """How many tokens to draft next: the K that maximises the expected tokens per second,
    ``(1 - a^(K+1)) / (1 - a)`` tokens for ``plain + K * per_draft`` seconds, from the
    acceptance rate ``a`` of drafted tokens and the measured :class:`StepCosts`. When no K
    beats plain steps, drafting rests (4 steps, then 8, ... 64 while it keeps not paying),
    then tries one token."""

    def __init__(self, max_tokens: int, costs: StepCosts, acceptance: Acceptance) -> None:
        self.max_tokens = max_tokens
        self.costs = costs
        self.acceptance = acceptance
        self.k = min(START_TOKENS, max_tokens)
        self.resting = 0  # steps left without a draft
        self.rest = FIRST_REST

    def next(self) -> int:
        if self.costs.plain_s is None:  # a plain step first: what drafts are measured against
            return 0
        if self.resting > 0:
            self.resting -= 1
            return 0
        return self.k

    def update(self, proposed: int, kept: int) -> None:
        if proposed == 0:
            return
        self.acceptance.update(proposed, kept)
        self.k = self.best()
        if self.k == 0:
            self.resting, self.rest = self.rest, min(MAX_REST, 2 * self.rest)
            self.k = 1  # after the rest: one token, to learn whether drafts pay again
        else:
            self.rest = FIRST_REST

    def best(self) -> int:
        """The K with the most expected tokens/s (0: plain steps are faster)."""
        plain, per_draft = self.costs.plain_s, self.costs.per_draft_s
        if plain is None or per_draft is None:
            return self.k
        a = min(self.acceptance.rate, MAX_ACCEPTANCE)
        best_k, best_rate = 0, MIN_GAIN / plain
        for k in range(1, self.max_tokens + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / (plain + k * per_draft)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k


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
    """A drafter and the most tokens a step may draft (``--draft``, ``--draft-tokens``), and
    what steps have cost and how often drafts were kept so far (kept from one request to the
    next: a request starts from what the previous ones learned)."""

    drafter: Drafter
    max_tokens: int = DEFAULT_DRAFT_TOKENS
    costs: StepCosts = field(default_factory=StepCosts)
    acceptance: Acceptance = field(default_factory=Acceptance)  # the next request's prior
    slot_drafters: dict[int, Drafter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_draft_tokens(self.max_tokens)

    def drafter_for(self, slot: int) -> Drafter:
        """The drafter of the sequence in KV slot ``slot`` of a decode batch: prompt lookup
        is shared (it keeps nothing), a draft model gets a KV slot of its own per sequence."""
        if slot == 0 or not isinstance(self.drafter, ModelDrafter):
            return self.drafter
        if slot not in self.slot_drafters:
            self.slot_drafters[slot] = self.drafter.for_slot(slot)
        return self.slot_drafters[slot]


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
        self.length = DraftLength(speculation.max_tokens, speculation.costs,
                                  speculation.acceptance)
        self.costs = speculation.costs
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
        started = time.perf_counter()
        k = min(self.length.next(), room - 1, self.runner.max_seq_len - position - 1)
        draft = self.drafter.propose(history, k, self.sampler) if k > 0 else None
        tokens = [history[-1], *(draft.tokens if draft else [])]
        rows = self.runner.rows_logits(torch.tensor(tokens, dtype=torch.int64), position)
        self._stats.steps += 1
        if draft is None or not draft.tokens:
            out = [self.sampler(rows[0], history)]
            self.costs.plain(time.perf_counter() - started)
            return out
        out = verify(self.sampler, rows, draft, history)
        self.costs.drafted(time.perf_counter() - started, len(draft.tokens))
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
    from edgetp.config.model import load_model_config
    from edgetp.model.checkpoint import load_model
    from edgetp.model.context import default_context, whole_model_bytes_per_position

    mismatch = tokenizer_mismatch(tokenizer, Tokenizer.from_dir(model_dir))
    if mismatch is not None:
        raise ConfigError(f"--draft {spec}: its tokenizer is not the model's: {mismatch}; a "
                          "draft model must share the model's tokenizer")
    config = load_model_config(model_dir)  # its cache: the model's context, or what fits here
    fits = default_context(config, whole_model_bytes_per_position(config, dtype.itemsize),
                           where="the draft model on this node")
    model = load_model(model_dir, dtype, min(max_seq_len, fits))
    return ModelDrafter(model, vocab_size)  # (past its context it drafts nothing)
