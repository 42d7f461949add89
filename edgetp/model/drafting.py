"""Drafters: what proposes the tokens a speculative step verifies (master-only).

* :class:`LookupDrafter` (``--draft lookup``): prompt lookup, n-gram drafting. The longest
  suffix of the text so far (up to ``max_ngram`` tokens) that occurred before proposes the
  tokens that followed its latest earlier occurrence. Free to compute, any model; strong when
  the output copies from the prompt (summaries, edits, code).
* :class:`ModelDrafter` (``--draft MODEL_DIR``): a small model with the same tokenizer, whole
  in the master's process, decoding K tokens ahead with its own KV cache. Its cache keeps the
  tokens it was fed; a rejected draft is rolled back by feeding again from the first token it
  does not share with the new context (a position reset, no copy).

A drafter sees token ids, which only the master holds; nothing here leaves the master.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from edgetp.model.llama import Transformer
from edgetp.model.sampling import Sampler
from edgetp.model.speculative import Draft
from edgetp.model.tokenizer import Tokenizer

NO_DRAFT = Draft([])


class Drafter(Protocol):
    """Proposes up to ``k`` tokens to follow ``context`` (the prompt and what was generated)."""

    name: str

    def reset(self) -> None:
        """A new sequence starts."""

    def propose(self, context: Sequence[int], k: int, sampler: Sampler) -> Draft: ...


class LookupDrafter:
    """Prompt lookup: continue the latest earlier occurrence of the context's last n-gram."""

    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes {min_ngram}..{max_ngram}: need 1 <= min <= max")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def reset(self) -> None:
        return None  # no state: every proposal searches the context it is given

    def propose(self, context: Sequence[int], k: int, sampler: Sampler) -> Draft:
        tokens = list(context)
        n = len(tokens)
        for size in range(min(self.max_ngram, n - 1), self.min_ngram - 1, -1):
            suffix = tokens[n - size:]
            for start in range(n - size - 1, -1, -1):  # the latest occurrence first
                if tokens[start:start + size] == suffix:
                    return Draft(tokens[start + size:start + size + k])
        return NO_DRAFT


class ModelDrafter:
    """A small model decoding ``k`` tokens ahead with the target's sampling settings."""

    name = "model"

    def __init__(self, model: Transformer, vocab_size: int, slot: int = 0) -> None:
        self.model = model
        self.vocab_size = vocab_size  # the target's logits width: the draft's is fitted to it
        self.slot = slot  # the draft model's KV slot: one per sequence of a decode batch
        self.fed: list[int] = []  # the tokens whose keys and values are in the draft's cache

    def for_slot(self, slot: int) -> ModelDrafter:
        """A drafter of the same model for another sequence (its own KV slot)."""
        return ModelDrafter(self.model, self.vocab_size, slot)

    def reset(self) -> None:
        self.fed = []

    @torch.inference_mode()
    def propose(self, context: Sequence[int], k: int, sampler: Sampler) -> Draft:
        history = list(context)
        k = min(k, self.model.max_seq_len - len(history))
        if k <= 0 or not history:
            return NO_DRAFT
        common = min(_shared_prefix(self.fed, history), len(history) - 1)
        logits = self._feed(history[common:], common)  # [V]
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        for i in range(k):
            if sampler.greedy:
                token = sampler.greedy_token(logits, history + tokens)
            else:
                q = sampler.distribution(logits, history + tokens)  # [V]
                token = sampler.draw(q)
                probs.append(q)
            tokens.append(token)
            if i < k - 1:
                logits = self._feed([token], len(history) + i)
        return Draft(tokens, torch.stack(probs) if probs else None)

    def _feed(self, tokens: list[int], start: int) -> torch.Tensor:
        """Run ``tokens`` at positions ``start..`` (overwriting what the cache held there);
        -> the logits after the last one, [target V]."""
        h = self.model.forward_layers(self.model.embed(torch.tensor(tokens)), start,
                                      slot=self.slot)  # [T, d]
        self.fed = self.fed[:start] + tokens
        logits = self.model.head(h[-1:])[0]  # [V_draft]
        return _fit(logits, self.vocab_size)


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _fit(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Logits [V_draft] as [size]: padded ids beyond one model's table are never chosen."""
    if logits.numel() >= size:
        return logits[:size]
    pad = torch.full((size - logits.numel(),), float("-inf"), dtype=logits.dtype)
    return torch.cat((logits, pad))


def tokenizer_mismatch(target: Tokenizer, draft: Tokenizer) -> str | None:
    """Why ``draft`` cannot draft for ``target`` (None: the same tokens mean the same ids)."""
    ours, theirs = target.vocabulary(), draft.vocabulary()
    if ours != theirs:
        differ = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
        return (f"their vocabularies differ ({len(ours)} and {len(theirs)} tokens; e.g. "
                f"{', '.join(f'{t!r}={i}' for t, i in differ)})")
    if set(target.eos_token_ids) != set(draft.eos_token_ids):
        return (f"their end-of-sequence ids differ ({sorted(target.eos_token_ids)} and "
                f"{sorted(draft.eos_token_ids)})")
    return None
