"""Synthetic Llama checkpoints: seeded random weights in a Hugging Face model directory.

For benchmarks and tests that need a model of a given shape (up to a few GB) and no download.
:func:`write_model` writes ``config.json``, ``model.safetensors`` and, when the vocabulary can
hold its ids, the demo model's tokenizer (a master needs one). The safetensors file is written
by hand (8-byte little-endian header length, JSON header, then the raw tensors) one tensor at a
time, so memory stays near one tensor whatever the model's size.

Same arguments, same bytes: one ``torch.Generator`` seeded with ``seed`` draws every tensor in
file order. Linear weights and the embedding are normal with std ``initializer_range`` (0.02,
as Hugging Face initialises Llama), norms are ones and biases zeros: each layer then adds an
O(1) update to the residual stream, so activations stay finite however many layers there are.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edgetp.config.model import ModelConfig, parse_hf_config
from edgetp.core.files import read_json
from edgetp.model.demo import DEMO_MODEL_DIR

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
DEFAULT_STD = 0.02

ProgressFn = Callable[[int, int], None]  # (bytes written so far, total bytes)


def llama_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                 vocab: int, **extra: Any) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict of a float32 Llama; ``extra`` keys override."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1,
        "eos_token_id": 2, **extra,
    }


def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor of ``config`` (HF names) and its shape, in file order."""
    cfg = parse_hf_config(config)
    d, hd, inner = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d),
                                          "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{name}": shape
                       for name, shape in _layer_shapes(cfg, d, q, kv, inner).items()})
    return shapes


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of one decoder layer of ``cfg`` (names within the layer) and its shape."""
    hd = cfg.head_dim
    return _layer_shapes(cfg, cfg.hidden_size, cfg.num_attention_heads * hd,
                         cfg.num_key_value_heads * hd, cfg.intermediate_size)


def _layer_shapes(cfg: ModelConfig, d: int, q: int, kv: int,
                  inner: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (inner, d), "mlp.up_proj.weight": (inner, d),
        "mlp.down_proj.weight": (d, inner),
    }
    if cfg.qkv_bias:
        shapes.update({f"self_attn.{p}.bias": (n,) for p, n in
                       (("q_proj", q), ("k_proj", kv), ("v_proj", kv))})
    if cfg.o_bias:
        shapes["self_attn.o_proj.bias"] = (d,)
    if cfg.mlp_bias:
        shapes.update({"mlp.gate_proj.bias": (inner,), "mlp.up_proj.bias": (inner,),
                       "mlp.down_proj.bias": (d,)})
    return shapes


def _header(shapes: dict[str, tuple[int, ...]]) -> tuple[bytes, int]:
    """The length-prefixed JSON header (data 8-byte aligned) and the data's size in bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = 4 * torch.Size(shape).numel()
        header[name] = {"dtype": "F32", "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob, offset


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator, std: float) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=gen).mul_(std)


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0,
                      std: float = DEFAULT_STD, progress: ProgressFn | None = None) -> int:
    """A seeded float32 safetensors file of ``shapes``, one tensor at a time; its size."""
    header, total = _header(shapes)
    gen = torch.Generator().manual_seed(seed)
    done = 0
    with path.open("wb") as handle:
        handle.write(header)
        for name, shape in shapes.items():
            tensor = _init(name, shape, gen, std)
            handle.write(tensor.numpy().data)  # the tensor's own memory, no bytes copy
            done += tensor.numel() * 4
            if progress is not None:
                progress(done, total)
    return path.stat().st_size


def write_model(model_dir: str | Path, config: dict[str, Any], seed: int = 0,
                progress: ProgressFn | None = None) -> Path:
    """Write a seeded Llama of ``config`` into ``model_dir`` (created); returns the directory.

    The demo model's tokenizer files are copied when its ids fit the vocabulary, so a master
    can load the directory (its text is meaningless for random weights, its ids valid).
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config, indent=1))
    copy_demo_tokenizer(config, model_dir)
    std = float(config.get("initializer_range", DEFAULT_STD))
    write_safetensors(model_dir / WEIGHTS_FILE, tensor_shapes(config), seed, std, progress)
    return model_dir


def copy_demo_tokenizer(config: dict[str, Any], directory: Path) -> bool:
    """Copy the demo model's tokenizer files into ``directory`` if its ids fit ``config``'s
    vocabulary (a master then has a tokenizer: meaningless text, valid ids); whether it did."""
    if not tokenizer_fits(config):
        return False
    for name in TOKENIZER_FILES:
        if (DEMO_MODEL_DIR / name).is_file():
            shutil.copyfile(DEMO_MODEL_DIR / name, directory / name)
    widen_tokenizer(directory, int(config["vocab_size"]))
    return True


def widen_tokenizer(model_dir: Path, vocab: int) -> None:
    """The demo tokenizer with a word ``w<ID>`` for every id it lacks below ``vocab``.

    A random model's tokens are mostly ids the demo tokenizer does not have, which would decode
    to nothing and so never stream; with a word each, every token is a piece of text (one chunk
    of a stream) and equal texts are equal tokens. Written only when it differs (a split of the
    model then copies it again to rank 0, :mod:`edgetp.shard.split`).
    """
    data = read_json(DEMO_MODEL_DIR / "tokenizer.json", "demo tokenizer")
    words: dict[str, int] = data["model"]["vocab"]
    taken = set(words.values())
    words.update({f"w{i}": i for i in range(vocab) if i not in taken})
    text = json.dumps(data)
    path = model_dir / "tokenizer.json"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def tokenizer_fits(config: dict[str, Any]) -> bool:
    """True if every id of the demo tokenizer is below ``config``'s vocabulary size."""
    demo = read_json(DEMO_MODEL_DIR / "config.json", "demo model config")
    return int(config["vocab_size"]) >= int(demo["vocab_size"])


def model_bytes(config: dict[str, Any]) -> int:
    """The size of the weights file :func:`write_model` writes for ``config``."""
    header, total = _header(tensor_shapes(config))
    return len(header) + total
