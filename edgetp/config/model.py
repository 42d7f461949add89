"""A model's shape: a Hugging Face ``config.json`` read into a :class:`ModelConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetp.core.errors import ConfigError
from edgetp.core.files import read_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_type`` ``default``, ``linear`` or ``llama3``)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, as read from a Hugging Face ``config.json``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()  # layers that use the sliding window
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict` (not of HF's format: use :func:`parse_hf_config`)."""
        values = dict(data)
        values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
        values["eos_token_ids"] = tuple(values["eos_token_ids"])
        values["sliding_layers"] = tuple(values["sliding_layers"])
        return cls(**values)


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read ``MODEL_DIR/config.json`` into a :class:`ModelConfig`."""
    path = Path(model_dir) / "config.json"
    raw = read_json(path, "model config", fix="MODEL_DIR must be a Hugging Face model directory "
                    "containing config.json and model.safetensors")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return parse_hf_config(raw, source=str(path))


def parse_hf_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate Hugging Face config semantics (Llama 2/3/3.1/3.2, Mistral, Qwen2) to ours."""
    model_type = _check_architecture(raw, source)
    try:
        hidden = int(raw["hidden_size"])
        n_heads = int(raw["num_attention_heads"])
        n_layers = int(raw["num_hidden_layers"])
        intermediate = int(raw["intermediate_size"])
        vocab = int(raw["vocab_size"])
    except KeyError as exc:
        raise ConfigError(f"{source} lacks the required key {exc.args[0]!r}") from exc
    n_kv = int(raw.get("num_key_value_heads") or n_heads)
    head_dim = int(raw.get("head_dim") or hidden // n_heads)
    if n_heads % n_kv:
        raise ConfigError(
            f"{source}: num_attention_heads={n_heads} is not a multiple of "
            f"num_key_value_heads={n_kv}"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act={raw['hidden_act']!r} is unsupported (silu only)")
    attention_bias = bool(raw.get("attention_bias", False))
    qkv_bias = attention_bias or model_type == "qwen2"
    rope_theta, scaling = _parse_rope(raw, source)
    sliding, sliding_layers = _parse_sliding_window(raw, model_type, n_layers)
    return ModelConfig(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        attention_bias=attention_bias,
        qkv_bias=qkv_bias,
        o_bias=attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_window=sliding,
        sliding_layers=sliding_layers,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_as_id_tuple(raw.get("eos_token_id")),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
    )


def _check_architecture(raw: dict[str, Any], source: str) -> str:
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    unsupported = [a for a in architectures if a not in SUPPORTED_ARCHITECTURES]
    if unsupported:
        raise ConfigError(
            f"{source}: architectures={unsupported} is not supported; edgetp runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type={model_type!r} is not supported; edgetp runs "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return str(model_type)


def _parse_sliding_window(
    raw: dict[str, Any], model_type: str, n_layers: int
) -> tuple[int | None, tuple[int, ...]]:
    """The window and the layers that use it (Qwen2: only layers >= max_window_layers)."""
    window = raw.get("sliding_window")
    if not window:
        return None, ()
    layer_types = raw.get("layer_types")
    if layer_types:
        layers = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    elif model_type == "qwen2":
        if not raw.get("use_sliding_window", False):
            return None, ()
        first = int(raw.get("max_window_layers", n_layers))
        layers = tuple(range(first, n_layers))
    else:
        layers = tuple(range(n_layers))
    return (int(window), layers) if layers else (None, ())


def _parse_rope(raw: dict[str, Any], source: str) -> tuple[float, RopeScaling]:
    """Accept both ``rope_theta`` + ``rope_scaling`` (HF <= 4.x) and ``rope_parameters`` (5.x)."""
    params = dict(raw.get("rope_parameters") or {})
    legacy = raw.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, RopeScaling()
    scaling = RopeScaling(
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )
    return theta, scaling


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(int(v) for v in value)
    return (int(value),)
