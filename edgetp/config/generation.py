"""How a request generates: sampling (:class:`SamplingConfig`) and when to stop."""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgetp.core.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and not -(1 << 63) <= self.seed < 1 << 64:
            raise ConfigError(f"seed must fit in 64 bits (from -2**63 to 2**64 - 1), got "
                              f"{self.seed}")


@dataclass(frozen=True)
class GenerationConfig:
    """When generation stops."""

    max_new_tokens: int = 64
    stop_strings: tuple[str, ...] = ()
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
