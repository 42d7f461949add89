"""Tiny random Hugging Face models (the test oracle) and checkpoint-writing helpers.

``make_hf_model(tmp_dir, family)`` builds a small float32 ``transformers`` model whose config
exercises one feature of the Llama family, randomises *every* parameter (HF initialises biases
to zero and norms to one, which would hide bias and norm bugs) and saves it with
``save_pretrained`` (safetensors). ``transformers`` is imported lazily so that test modules
that only need the helpers for writing files do not pay for the import.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

VOCAB = 128
BASE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

# family -> (architecture class name, config overrides). transformers 5 takes RoPE settings
# as ``rope_parameters`` (and writes them so to config.json); edgetp parses both spellings.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama2": ("LlamaForCausalLM", {"num_hidden_layers": 3, "num_key_value_heads": 4}),
    "llama3": (
        "LlamaForCausalLM",
        {
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        },
    ),
    # original_max_position_embeddings=64 with head_dim 16 and theta 500000 puts one
    # frequency in each llama3 band: unchanged (high), smoothed (medium) and divided (low).
    "llama31": (
        "LlamaForCausalLM",
        {
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "llama32": ("LlamaForCausalLM", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "mistral": (
        "MistralForCausalLM",
        {"num_attention_heads": 8, "num_key_value_heads": 2, "sliding_window": 4096},
    ),
    "qwen2": ("Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "attn_bias": ("LlamaForCausalLM", {"num_key_value_heads": 2, "attention_bias": True}),
    "mlp_bias": ("LlamaForCausalLM", {"mlp_bias": True}),
    "head_dim": ("LlamaForCausalLM", {"num_key_value_heads": 2, "head_dim": 32}),
    "gqa1": ("LlamaForCausalLM", {"num_attention_heads": 8, "num_key_value_heads": 1}),
    "rms_eps": (
        "LlamaForCausalLM",
        {"rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}},
    ),
    # Extras beyond the classic checkpoints: linear RoPE scaling, and a Mistral sliding
    # window short enough that prompts and decoding actually cross it.
    "rope_linear": (
        "LlamaForCausalLM",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    ),
    "sliding": (
        "MistralForCausalLM",
        {"num_key_value_heads": 2, "sliding_window": 8},
    ),
}


# Per-family parameter scales for ``randomize_``. The rms_eps family gets tiny embeddings so
# the first norm's mean square (~1e-5) is comparable to eps and a wrong eps shows in the logits.
INIT_SCALES: dict[str, dict[str, float]] = {"rms_eps": {"embed_std": 0.003}}


def _classes(arch: str) -> tuple[type, type]:
    import transformers

    config_cls = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
    }[arch]
    return config_cls, getattr(transformers, arch)


def hf_config(family: str, **overrides: Any):
    """The ``transformers`` config of ``family`` (BASE, then the family's, then ``overrides``)."""
    arch, family_overrides = FAMILIES[family]
    config_cls, _ = _classes(arch)
    kwargs = {**BASE, **family_overrides, **overrides}
    if arch == "Qwen2ForCausalLM":
        kwargs.setdefault("use_sliding_window", False)
    return config_cls(**kwargs)


@torch.no_grad()
def randomize_(
    model: torch.nn.Module, seed: int = 0, std: float = 0.1, embed_std: float = 0.5
) -> None:
    """Overwrite every parameter with seeded noise: norms 1 + N(0, 0.1²), embeddings
    N(0, embed_std²), every other weight and bias N(0, std²)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            value = 1.0 + 0.1 * noise
        elif "embed_tokens" in name:
            value = embed_std * noise
        else:
            value = std * noise
        param.copy_(value.to(param.dtype))


def make_hf_model(tmp_dir: str | Path, family: str, seed: int = 0, **overrides: Any):
    """Build, randomise and save a tiny HF model of ``family``; returns ``(path, hf_model)``.

    ``path`` is ``tmp_dir / family`` holding ``config.json`` and ``model.safetensors``
    (float32). ``hf_model`` is the float32 model in eval mode with eager attention.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    arch, _ = FAMILIES[family]
    _, model_cls = _classes(arch)
    config = hf_config(family, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    randomize_(model, seed, **INIT_SCALES.get(family, {}))
    path = Path(tmp_dir) / family
    model.save_pretrained(path, safe_serialization=True)
    if not (path / "model.safetensors").is_file():
        raise RuntimeError(f"save_pretrained did not write model.safetensors in {path}")
    return path, model


def read_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file or sharded safetensors checkpoint, by name."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    tensors: dict[str, torch.Tensor] = {}
    for file_name in files:
        with safe_open(model_dir / file_name, framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def write_checkpoint(
    src_dir: str | Path,
    dst_dir: str | Path,
    *,
    num_shards: int = 1,
    dtype: torch.dtype | None = None,
    drop: tuple[str, ...] = (),
    config_updates: dict[str, Any] | None = None,
) -> Path:
    """Re-write the checkpoint in ``src_dir`` into ``dst_dir``.

    ``num_shards > 1`` writes ``model-0000i-of-0000n.safetensors`` files plus
    ``model.safetensors.index.json`` (tensors dealt round-robin, so every shard mixes layers);
    ``dtype`` casts every tensor; ``drop`` omits tensors by name; ``config_updates`` edits
    ``config.json``.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    for extra in src_dir.iterdir():
        if extra.suffix != ".safetensors" and extra.name != "model.safetensors.index.json":
            shutil.copy(extra, dst_dir / extra.name)
    if config_updates:
        config = json.loads((dst_dir / "config.json").read_text())
        config.update(config_updates)
        (dst_dir / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {
        name: (t.to(dtype) if dtype is not None else t).contiguous()
        for name, t in sorted(read_tensors(src_dir).items())
        if name not in drop
    }
    if num_shards <= 1:
        save_file(tensors, str(dst_dir / "model.safetensors"), metadata={"format": "pt"})
        return dst_dir
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for i, (name, tensor) in enumerate(tensors.items()):
        shards[i % num_shards][name] = tensor
    weight_map = {}
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(shard, str(dst_dir / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return dst_dir


def save_sharded_hf(hf_model, dst_dir: str | Path, max_shard_size: str | int = "20KB") -> Path:
    """Save ``hf_model`` with transformers' own sharding (index + several shard files)."""
    dst_dir = Path(dst_dir)
    hf_model.save_pretrained(dst_dir, safe_serialization=True, max_shard_size=max_shard_size)
    index = dst_dir / "model.safetensors.index.json"
    if not index.is_file():
        raise RuntimeError(f"save_pretrained(max_shard_size={max_shard_size!r}) did not shard")
    return dst_dir
