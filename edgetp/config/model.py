"""A model's shape: a Hugging Face ``config.json`` checked and read into a :class:`ModelConfig`.

:class:`HFConfig` is the schema of the keys edgetp reads (pydantic, like the rest of
:mod:`edgetp.config`): counts are whole numbers >= 1 (``"96"`` and ``true`` are not numbers),
the norm epsilon and RoPE base are positive, the heads divide as attention needs. Other keys
are ignored. A wrong value is one :class:`~edgetp.core.errors.ConfigError` that names the file,
the key, what it holds and what it must be.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from edgetp.config.schema import phrase, sentence, validate
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


# -- the schema of config.json ----------------------------------------------------------------

def _whole(value: Any) -> Any:
    """An integer, also when JSON wrote it as a float (``1e8``); never a string or a boolean."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | None):
        raise phrase(f"must be a whole number, got {value!r}")
    return value


def _ids(value: Any) -> Any:
    """A token id or a list of them (``eos_token_id``), as a list."""
    return value if isinstance(value, list) else None if value is None else [value]


Count = Annotated[int, BeforeValidator(_whole), Field(ge=1)]
Index = Annotated[int, BeforeValidator(_whole), Field(ge=0)]
TokenId = Annotated[int, BeforeValidator(_whole)]
PositiveNumber = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class RopeParams(BaseModel):
    """``rope_scaling`` (transformers <= 4) or ``rope_parameters`` (5): the RoPE variant."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    rope_type: str | None = None
    type: str | None = None  # the older spelling of rope_type
    rope_theta: PositiveNumber | None = None
    factor: PositiveNumber = 1.0
    low_freq_factor: PositiveNumber = 1.0
    high_freq_factor: PositiveNumber = 4.0
    original_max_position_embeddings: Count | None = None

    @property
    def kind(self) -> str:
        return self.rope_type or self.type or "default"


class HFConfig(BaseModel):
    """The keys of a Llama-family ``config.json`` that edgetp reads (the others are ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    hidden_size: Count
    num_attention_heads: Count
    num_hidden_layers: Count
    intermediate_size: Count
    vocab_size: Count
    num_key_value_heads: Count | None = None
    head_dim: Count | None = None
    max_position_embeddings: Count = 2048
    rms_norm_eps: PositiveNumber = 1e-6
    hidden_act: str = "silu"
    rope_theta: PositiveNumber | None = None
    rope_scaling: RopeParams | None = None
    rope_parameters: RopeParams | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: Index | None = None  # 0 or null: none
    use_sliding_window: bool = False
    max_window_layers: Index | None = None
    layer_types: list[str] | None = None
    bos_token_id: TokenId | None = None
    eos_token_id: Annotated[list[TokenId] | None, BeforeValidator(_ids)] = None
    torch_dtype: str | None = None
    dtype: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _required_keys(cls, data: Any) -> Any:
        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers",
                    "intermediate_size", "vocab_size"):
            if key not in data:
                raise sentence(f"the required key {key!r} is missing")
        return data

    @model_validator(mode="after")
    def _heads_divide(self) -> HFConfig:
        heads, kv = self.num_attention_heads, self.kv_heads
        if heads % kv:
            raise sentence(f"num_attention_heads={heads} is not a multiple of "
                           f"num_key_value_heads={kv}")
        if self.head_dim is None and self.hidden_size % heads:
            raise sentence(f"hidden_size={self.hidden_size} is not a multiple of "
                           f"num_attention_heads={heads}; give head_dim")
        if self.hidden_act != "silu":
            raise sentence(f"hidden_act={self.hidden_act!r} is unsupported (silu only)")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def rope(self) -> RopeParams:
        """``rope_parameters`` over ``rope_scaling`` (transformers 5 writes both)."""
        legacy = self.rope_scaling.model_dump(exclude_unset=True) if self.rope_scaling else {}
        params = self.rope_parameters.model_dump(exclude_unset=True) \
            if self.rope_parameters else {}
        return RopeParams.model_validate({**legacy, **params})


def parse_hf_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate Hugging Face config semantics (Llama 2/3/3.1/3.2, Mistral, Qwen2) to ours.

    Raises :class:`ConfigError` naming ``source`` and the key for a config edgetp cannot run.
    """
    model_type = _check_architecture(raw, source)
    hf = validate(HFConfig, raw, source)
    attention_bias = hf.attention_bias
    rope_theta, scaling = _parse_rope(hf, source)
    sliding, sliding_layers = _parse_sliding_window(hf, model_type)
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.kv_heads,
        head_dim=hf.head_dim or hf.hidden_size // hf.num_attention_heads,
        rms_norm_eps=hf.rms_norm_eps,
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.max_position_embeddings,
        attention_bias=attention_bias,
        qkv_bias=attention_bias or model_type == "qwen2",
        o_bias=attention_bias,
        mlp_bias=hf.mlp_bias,
        tie_word_embeddings=hf.tie_word_embeddings,
        sliding_window=sliding,
        sliding_layers=sliding_layers,
        bos_token_id=hf.bos_token_id,
        eos_token_ids=tuple(hf.eos_token_id or ()),
        torch_dtype=hf.torch_dtype or hf.dtype or "float32",
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


def _parse_sliding_window(hf: HFConfig, model_type: str) -> tuple[int | None, tuple[int, ...]]:
    """The window and the layers that use it (Qwen2: only layers >= max_window_layers)."""
    window, n_layers = hf.sliding_window, hf.num_hidden_layers
    if not window:
        return None, ()
    if hf.layer_types:
        layers = tuple(i for i, kind in enumerate(hf.layer_types) if kind == "sliding_attention")
    elif model_type == "qwen2":
        if not hf.use_sliding_window:
            return None, ()
        first = n_layers if hf.max_window_layers is None else hf.max_window_layers
        layers = tuple(range(first, n_layers))
    else:
        layers = tuple(range(n_layers))
    return (window, layers) if layers else (None, ())


def _parse_rope(hf: HFConfig, source: str) -> tuple[float, RopeScaling]:
    """Accept both ``rope_theta`` + ``rope_scaling`` (HF <= 4.x) and ``rope_parameters`` (5.x)."""
    params = hf.rope
    theta = params.rope_theta or hf.rope_theta or 10000.0
    if params.kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope type {params.kind!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if params.kind == "default":
        return theta, RopeScaling()
    if params.kind == "llama3" and params.high_freq_factor <= params.low_freq_factor:
        raise ConfigError(
            f"{source}: rope high_freq_factor={params.high_freq_factor:g} must be above "
            f"low_freq_factor={params.low_freq_factor:g}"
        )
    given = hf.max_position_embeddings if "max_position_embeddings" in hf.model_fields_set \
        else 8192
    original = params.original_max_position_embeddings or given
    scaling = RopeScaling(
        rope_type=params.kind,
        factor=params.factor,
        low_freq_factor=params.low_freq_factor,
        high_freq_factor=params.high_freq_factor,
        original_max_position_embeddings=original,
    )
    return theta, scaling
