"""A GGUF file's metadata as Hugging Face ``config.json`` and ``generation_config.json``.

Keys are llama.cpp's (``llama.block_count``, ``qwen2.rope.freq_base`` ...). RoPE scaling:
``linear`` comes from ``{arch}.rope.scaling.*``; Llama 3.1-style (``llama3``) scaling is stored
by llama.cpp only as the per-frequency factors of the ``rope_freqs.weight`` tensor, so its
parameters are recovered from them (factor, and the band limits of Llama 3.1/3.2, checked
against every stored factor).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgetp.model.gguf.reader import GGUFError, GGUFFile
from edgetp.model.gguf.tensors import read_rows

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
LLAMA3_BANDS = (1.0, 4.0)  # low_freq_factor, high_freq_factor of Llama 3.1 and 3.2


def check_architecture(file: GGUFFile) -> str:
    arch = file.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{file.path} holds a {arch or 'unnamed'!r} model, which edgetp does "
                        f"not run", f"edgetp converts {', '.join(ARCHITECTURES)} GGUF files "
                        "(Llama 2/3, Mistral, SmolLM, Qwen2 ...)")
    return arch


def hf_config(file: GGUFFile, torch_dtype: str) -> dict[str, Any]:
    """``config.json`` for the model in ``file``."""
    arch = check_architecture(file)
    heads = int(file.required("attention.head_count"))
    hidden = int(file.required("embedding_length"))
    head_dim = int(file.arch_value("attention.key_length") or hidden // heads)
    rotary = int(file.arch_value("rope.dimension_count") or head_dim)
    if rotary != head_dim:
        raise GGUFError(f"{file.path}: RoPE over {rotary} of {head_dim} dimensions per head is "
                        "not supported")
    embed = file.tensors["token_embd.weight"]
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(file.required("feed_forward_length")),
        "num_hidden_layers": int(file.required("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(file.arch_value("attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(file.required("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(file.arch_value("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(file.arch_value("context_length", 2048)),
        "vocab_size": int(embed.shape[1]),
        "tie_word_embeddings": "output.weight" not in file.tensors,
        "torch_dtype": torch_dtype,
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in file.tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in file.tensors
    else:
        config["use_sliding_window"] = False
    if (scaling := rope_scaling(file, head_dim, config["rope_theta"])) is not None:
        config["rope_scaling"] = scaling
    config.update(special_ids(file))
    return config


def special_ids(file: GGUFFile) -> dict[str, int]:
    ids = {}
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        value = file.value(f"tokenizer.ggml.{key}")
        if value is not None:
            ids[name] = int(value)
    return ids


def generation_config(file: GGUFFile) -> dict[str, Any]:
    """``generation_config.json``: the BOS, EOS and padding ids."""
    return special_ids(file)


def rope_scaling(file: GGUFFile, head_dim: int, theta: float) -> dict[str, Any] | None:
    """``rope_scaling`` of config.json, or None for plain RoPE."""
    kind = file.arch_value("rope.scaling.type")
    factor = file.arch_value("rope.scaling.factor")
    if "rope_freqs.weight" in file.tensors:
        return _llama3_scaling(file, head_dim, theta)
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    if kind != "linear":
        raise GGUFError(f"{file.path}: RoPE scaling {kind!r} is not supported",
                        "edgetp runs plain, linear and llama3 RoPE")
    return {"rope_type": "linear", "factor": float(factor)}


def _llama3_scaling(file: GGUFFile, head_dim: int, theta: float) -> dict[str, Any]:
    factors = read_rows(file.tensors["rope_freqs.weight"], slice(None)).double().numpy()
    original = int(file.arch_value("rope.scaling.original_context_length") or 8192)
    scaling = {"rope_type": "llama3", "factor": float(np.float32(factors.max())),
               "low_freq_factor": LLAMA3_BANDS[0], "high_freq_factor": LLAMA3_BANDS[1],
               "original_max_position_embeddings": original}
    expected = llama3_factors(head_dim, theta, scaling)
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-4):
        raise GGUFError(f"{file.path}: its rope_freqs.weight factors are not Llama 3.1-style "
                        "RoPE scaling (low/high frequency factors 1 and 4)",
                        "this RoPE variant is not supported")
    return scaling


def llama3_factors(head_dim: int, theta: float, scaling: dict[str, Any]) -> np.ndarray:
    """The divisor of each rotary frequency under llama3 scaling (what llama.cpp stores)."""
    freqs = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    smooth = (original / wavelen - low) / (high - low)
    mixed = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0,
                    np.where(wavelen > original / low, factor, mixed))
