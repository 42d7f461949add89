"""What the API server serves and how: :class:`ServerSettings` and the default model id."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgetp.config.generation import SamplingConfig
from edgetp.core.errors import ConfigError
from edgetp.shard.layout import rank_of


@dataclass(frozen=True)
class ServerSettings:
    """What the server serves and how.

    ``default_max_tokens`` and ``default_sampling`` apply to the fields a request leaves out;
    ``stop_strings`` are added to every request's ``stop``. ``max_connections`` HTTP
    connections may be open at once (more are answered 503); ``prompt_workers`` prompts are
    rendered and tokenized at once (the others wait).
    """

    model_name: str
    api_key: str | None = None
    queue_size: int = 16
    default_max_tokens: int = 64
    default_sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_strings: tuple[str, ...] = ()
    max_connections: int = 64
    prompt_workers: int = 2

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ConfigError(f"the connection limit must be >= 1, got {self.max_connections}")
        if self.prompt_workers < 1:
            raise ConfigError(f"prompt workers must be >= 1, got {self.prompt_workers}")
        if self.queue_size < 1:
            raise ConfigError(f"the queue size must be >= 1, got {self.queue_size}")
        if self.default_max_tokens < 1:
            raise ConfigError(f"max tokens must be >= 1, got {self.default_max_tokens}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("the API key must not be empty")


def default_model_name(path: str | Path) -> str:
    """The id clients use by default: the model directory's name (a shard's parent's name)."""
    path = Path(path).resolve()
    if rank_of(path) is not None and path.parent.name:
        return path.parent.name
    return path.name or "edgetp"
