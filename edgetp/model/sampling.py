"""Choosing the next token from logits: pure functions, seeded, master-only.

Greedy when temperature is 0; otherwise repetition penalty, temperature, top-k and top-p are
applied in that order (the order Hugging Face's logits processors use) and a token is drawn
with the sampler's own ``torch.Generator`` so a seed reproduces a generation exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edgetp.config.generation import SamplingConfig


def apply_repetition_penalty(
    logits: torch.Tensor, previous_ids: Sequence[int], penalty: float
) -> torch.Tensor:
    """CTRL-style penalty: divide positive, multiply negative logits of seen tokens. [V] -> [V]."""
    if penalty == 1.0 or not previous_ids:
        return logits
    ids = torch.tensor(sorted(set(previous_ids)), dtype=torch.int64)
    seen = logits.index_select(0, ids)
    penalised = torch.where(seen > 0, seen / penalty, seen * penalty)
    out = logits.clone()
    out[ids] = penalised
    return out


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits, set the rest to -inf. [V] -> [V]; k = 0 keeps all."""
    if k <= 0 or k >= logits.numel():
        return logits
    threshold = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability reaches p. [V] -> [V]."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative - sorted_logits.softmax(-1) >= p  # mass before this token >= p
    drop_sorted[0] = False  # always keep the most likely token
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``. [V] -> [V]. A temperature so small that the quotients
    overflow is applied to the logits shifted so their largest is 0 (the same distribution:
    softmax does not change with a shift), so the result stays a distribution."""
    scaled = logits / temperature
    if not torch.isfinite(scaled.max()):  # in float64, where such a temperature is not 0
        shifted = logits.double() - logits.double().max()
        scaled = (shifted / temperature).to(logits.dtype)
    return scaled


class Sampler:
    """Turns a logits vector into the next token id according to a :class:`SamplingConfig`."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self.generator = torch.Generator()
        if config.seed is not None:
            self.generator.manual_seed(config.seed)
        else:
            self.generator.seed()

    @property
    def greedy(self) -> bool:
        return self.config.temperature == 0.0

    def __call__(self, logits: torch.Tensor, previous_ids: Sequence[int] = ()) -> int:
        """logits: [V] float -> token id."""
        if self.greedy:
            return self.greedy_token(logits, previous_ids)
        probs = self.distribution(logits, previous_ids)
        return int(torch.multinomial(probs, 1, generator=self.generator).item())

    def greedy_token(self, logits: torch.Tensor, previous_ids: Sequence[int] = ()) -> int:
        """The most likely token after the repetition penalty. logits: [V] -> token id."""
        penalised = apply_repetition_penalty(logits.float(), previous_ids,
                                             self.config.repetition_penalty)
        return int(torch.argmax(penalised).item())

    def distribution(self, logits: torch.Tensor, previous_ids: Sequence[int] = ()
                     ) -> torch.Tensor:
        """The probabilities a token is drawn from (temperature > 0): penalty, temperature,
        top-k, top-p, softmax. logits: [V] -> probs [V] float32."""
        cfg = self.config
        logits = apply_repetition_penalty(logits.float(), previous_ids, cfg.repetition_penalty)
        logits = apply_top_p(apply_top_k(apply_temperature(logits, cfg.temperature), cfg.top_k),
                             cfg.top_p)
        return logits.softmax(-1)

    def uniform(self) -> float:
        """One draw from U[0, 1) on this sampler's generator (speculative acceptance)."""
        return float(torch.rand((), generator=self.generator).item())

    def draw(self, probs: torch.Tensor) -> int:
        """One token drawn from ``probs`` [V] on this sampler's generator."""
        return int(torch.multinomial(probs, 1, generator=self.generator).item())
