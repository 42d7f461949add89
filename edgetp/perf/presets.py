"""Published model configurations, so a cluster can be planned without the checkpoint.

Each preset is the model's Hugging Face ``config.json`` (the fields edgetp reads), parsed by
:func:`edgetp.config.parse_hf_config` exactly like a downloaded one. ``edgetp plan --model
llama2-70b`` uses them; a model directory works too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetp.config.model import ModelConfig, load_model_config, parse_hf_config
from edgetp.core.errors import ConfigError

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "attention_bias": False,
          "mlp_bias": False}
_LLAMA2 = {**_LLAMA, "vocab_size": 32000, "max_position_embeddings": 4096,
           "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1,
           "eos_token_id": 2}
_LLAMA31 = {**_LLAMA, "vocab_size": 128256, "max_position_embeddings": 131072,
            "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 128000,
            "eos_token_id": 128001,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}}
_LLAMA32 = {**_LLAMA31, "tie_word_embeddings": True, "head_dim": 64,
            "rope_scaling": {**_LLAMA31["rope_scaling"], "factor": 32.0}}  # type: ignore[dict-item]

# name -> (source checkpoint, HF config). Sizes as published on the Hugging Face Hub.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama2-7b": ("meta-llama/Llama-2-7b-hf", {
        **_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32}),
    "llama2-13b": ("meta-llama/Llama-2-13b-hf", {
        **_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 40}),
    "llama2-70b": ("meta-llama/Llama-2-70b-hf", {
        **_LLAMA2, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8}),
    "llama3.1-8b": ("meta-llama/Llama-3.1-8B", {
        **_LLAMA31, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8}),
    "llama3.1-70b": ("meta-llama/Llama-3.1-70B", {
        **_LLAMA31, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8}),
    "llama3.2-1b": ("meta-llama/Llama-3.2-1B", {
        **_LLAMA32, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8}),
    "llama3.2-3b": ("meta-llama/Llama-3.2-3B", {
        **_LLAMA32, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
        "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128}),
    "mistral-7b": ("mistralai/Mistral-7B-v0.1", {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "max_position_embeddings": 32768, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2}),
    "qwen2.5-72b": ("Qwen/Qwen2.5-72B-Instruct", {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 80,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 151643,
        "eos_token_id": 151645}),
    "yi-34b": ("01-ai/Yi-34B", {
        **_LLAMA, "hidden_size": 7168, "intermediate_size": 20480, "num_hidden_layers": 60,
        "num_attention_heads": 56, "num_key_value_heads": 8, "vocab_size": 64000,
        "max_position_embeddings": 4096, "rope_theta": 5000000.0, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2}),
}


def preset_config(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of a preset (names as in :data:`PRESETS`, case-insensitive)."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of "
                          f"{', '.join(PRESETS)} or give a model directory")
    source, raw = PRESETS[key]
    return parse_hf_config(raw, source=f"preset {key} ({source})")


def hf_config(spec: str | Path) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of a preset (by name) or of a model directory."""
    path = Path(spec)
    if path.is_dir():
        from edgetp.core.files import read_json

        load_model_config(path)  # the same checks and messages as a model directory gets
        return dict(read_json(path / "config.json", "model config"))
    key = str(spec).lower()
    if key not in PRESETS:
        raise ConfigError(f"{spec!r} is neither a model directory (with config.json) nor a "
                          f"preset; presets: {', '.join(PRESETS)}")
    return dict(PRESETS[key][1])


def resolve_model(spec: str | Path) -> tuple[str, ModelConfig]:
    """A model directory (with config.json) or a preset name -> (display name, config)."""
    path = Path(spec)
    if path.is_dir():
        return path.name, load_model_config(path)
    if str(spec).lower() in PRESETS:
        return str(spec).lower(), preset_config(str(spec))
    raise ConfigError(f"{spec!r} is neither a model directory (with config.json) nor a preset; "
                      f"presets: {', '.join(PRESETS)}")


def stored_float_dtype(spec: str | Path) -> str:
    """The float dtype a checkpoint stores (a quantized split keeps it for norms, embedding and
    biases): its first tensor's, for a model directory; bfloat16, as published, for a preset."""
    path = Path(spec)
    if not path.is_dir():
        return "bfloat16"
    from edgetp.model.checkpoint import Checkpoint
    from edgetp.shard.split import source_dtype

    return source_dtype(Checkpoint(path))
