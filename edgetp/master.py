"""The master role: the only node that sees text, token ids, logits and sampling settings.

A :class:`Master` owns the tokenizer and an :class:`~edgetp.engine.Engine` over a runner. With
no workers the runner is the whole model in this process; a cluster master's runner drives its
workers (see ``edgetp.cluster``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from edgetp.config import GenerationConfig, SamplingConfig
from edgetp.engine import Engine, GenerationResult, LocalRunner, Runner
from edgetp.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class Prompt:
    """A user prompt: raw text, or (``chat=True``) one user message rendered by the template."""

    text: str
    chat: bool = False
    system: str | None = None


class Master:
    """Tokenize, run the engine, detokenize."""

    def __init__(self, tokenizer: Tokenizer, runner: Runner) -> None:
        self.tokenizer = tokenizer
        self.runner = runner
        self.engine = Engine(runner, tokenizer, tokenizer.eos_token_ids)

    @classmethod
    def local(
        cls, model_dir: str | Path, dtype: str = "float32", max_seq_len: int | None = None
    ) -> Master:
        """A single-process master holding the whole model."""
        from edgetp.checkpoint import load_model

        model = load_model(model_dir, parse_dtype(dtype), max_seq_len)
        return cls(Tokenizer.from_dir(model_dir), LocalRunner(model))

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
