"""Speculative verification: which drafted tokens the target keeps (pure, master-only).

A step feeds the target the rows ``[last, d_1 .. d_K]`` (``last``: the newest token, not yet
in the KV cache; ``d_i``: the draft). Row ``i`` of its logits predicts the token after row
``i``'s token, so row ``i - 1`` judges ``d_i`` and row ``K`` gives one token more. The step
returns the accepted prefix of the draft plus one token from the target, so it always makes
progress (at least one token, at most ``K + 1``).

* Greedy (temperature 0): ``d_i`` is kept while it is the target's greedy token; the first
  disagreement is replaced by the target's token. Identical to decoding one token at a time
  from the same logits.
* Sampled: the rule of Leviathan et al. and Chen et al. (2023): keep ``d_i`` with probability
  ``min(1, p_i(d_i) / q_i(d_i))``; on the first rejection draw from ``max(0, p_i - q_i)``
  normalised; all kept: draw from ``p_K``. The tokens are distributed exactly as tokens drawn
  from ``p`` one at a time. A drafter without a distribution (prompt lookup) proposes
  deterministically: its ``q_i`` is one-hot on ``d_i``.

``p_i`` is the sampler's own distribution (repetition penalty over the history including the
draft before ``d_i``, temperature, top-k, top-p), the one it would draw from without a draft.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edgetp.model.sampling import Sampler


@dataclass(frozen=True)
class Draft:
    """Tokens a drafter proposes, and the distributions it drew them from (None: it chose
    them deterministically, as prompt lookup does)."""

    tokens: list[int]
    probs: torch.Tensor | None = None  # [K, V] float32, row i: what d_i was drawn from

    def __post_init__(self) -> None:
        if self.probs is not None and self.probs.shape[0] != len(self.tokens):
            raise ValueError(f"{len(self.tokens)} drafted tokens with {self.probs.shape[0]} "
                             "distributions")


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``max(0, p - q)`` normalised: what a rejected draft token is replaced from. [V] -> [V].
    (When ``p`` and ``q`` are equal a rejection cannot happen; ``p`` is returned.)"""
    rest = (p - q).clamp_min(0)
    total = rest.sum()
    return p if total <= 0 else rest / total


def keep_or_replace(sampler: Sampler, p: torch.Tensor, q: torch.Tensor, token: int
                    ) -> int | None:
    """The sampled rule for one drafted ``token``: None to keep it, else its replacement.
    p, q: [V] probabilities of the target and the draft at this position."""
    q_token = float(q[token])
    if q_token <= 0:  # the draft cannot have drawn it; treat as a sure rejection
        return sampler.draw(p)
    if sampler.uniform() < min(1.0, float(p[token]) / q_token):
        return None
    return sampler.draw(residual(p, q))


def one_hot(token: int, size: int) -> torch.Tensor:
    out = torch.zeros(size)
    out[token] = 1.0
    return out


def verify(sampler: Sampler, rows: torch.Tensor, draft: Draft, history: Sequence[int]
           ) -> list[int]:
    """The tokens of one speculative step. rows: [K + 1, V] target logits of ``[last, d_1 ..
    d_K]``; history: every token so far (prompt and generated, ``last`` included)."""
    k = len(draft.tokens)
    if rows.shape[0] != k + 1:
        raise ValueError(f"{rows.shape[0]} rows of logits for a draft of {k} tokens")
    kept: list[int] = []
    for i, token in enumerate(draft.tokens):
        previous = [*history, *kept]
        if sampler.greedy:
            choice = sampler.greedy_token(rows[i], previous)
            replacement = None if choice == token else choice
        else:
            p = sampler.distribution(rows[i], previous)
            q = one_hot(token, p.numel()) if draft.probs is None else draft.probs[i]
            replacement = keep_or_replace(sampler, p, q, token)
        if replacement is not None:
            return [*kept, replacement]
        kept.append(token)
    return [*kept, sampler(rows[k], [*history, *kept])]
