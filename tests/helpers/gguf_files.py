"""Tiny GGUF files written the way llama.cpp's converter writes them (the tests' GGUF inputs).

``write_gguf(hf_dir, path, ...)`` turns a tiny Hugging Face model (``helpers.hf_models``) into a
GGUF file with ``gguf.GGUFWriter``: llama.cpp's metadata keys and tensor names, the Q and K rows
of a Llama model reordered as llama.cpp does, each matrix in the type asked for (quantized with
``gguf.quants`` where it can; K-quants, which it cannot make, as valid random blocks) and a
vocabulary of the kind asked for (``gpt2`` byte-level BPE or ``llama`` SentencePiece).
:func:`gguf_weights` reads back what the file holds, dequantized, in Hugging Face names and row
order: the exact values a converter must produce.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from helpers.hf_models import read_tensors

Q = gguf.GGMLQuantizationType
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_PARTS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
SYMBOL_RUNS = ["123", "45", "Ġ123", "ĠĠĠ", "ĊĊ", "ĠĊ", "'S"]  # merges where pre-tokenizers differ
WORDS = ["the", "ing", "and", "is", "of", "to", "in", "it", "on", "he", "er", "at", "world",
         "hello", "model", "tiny", "test", "text", "cat", "dog"]


def gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    _, _, layer, *rest = hf.split(".")
    kind = rest[-1]
    return f"blk.{layer}.{LAYER_PARTS['.'.join(rest[:-1])]}.{kind}"


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of Q/K rows (HF -> GGUF)."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _blocks(w: np.ndarray, qtype: Q, seed: int) -> np.ndarray:
    """``w`` [rows, cols] as ``qtype``'s raw bytes; K-quants as random valid blocks."""
    if qtype in (Q.F32,):
        return w.astype(np.float32)
    if qtype not in K_QUANTS:
        return gguf.quants.quantize(w.astype(np.float32), qtype)
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    rows, cols = w.shape
    raw = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    scales = (rng.uniform(0.001, 0.004, size=(rows, cols // block_elems, 2))
              .astype(np.float16).view(np.uint8))  # [.., 4] bytes: d and dmin
    if qtype == Q.Q6_K:
        raw[..., -2:] = scales[..., :2]  # d is the block's last two bytes
        sub_scales = rng.integers(-20, 20, size=raw[..., -18:-2].shape).astype(np.int8)
        raw[..., -18:-2] = sub_scales.view(np.uint8)
    else:
        raw[..., :4] = scales  # d, dmin first
    return raw.reshape(rows, cols // block_elems * block_bytes)


def write_gguf(hf_dir: Path, path: Path, types: dict[str, Q] | Q = Q.F32,
               vocab: str = "gpt2", pre: str = "smollm", seed: int = 0,
               extra: dict[str, Any] | None = None) -> Path:
    """Write the model in ``hf_dir`` as a GGUF file ``path`` (see the module docstring).

    ``types``: one type for every matrix, or a type per GGUF tensor name (others F32). Norms and
    biases stay F32 as llama.cpp keeps them.
    """
    config = json.loads((hf_dir / "config.json").read_text())
    arch = config["model_type"]
    arch = "llama" if arch == "mistral" else arch
    writer = gguf.GGUFWriter(str(path), arch)
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    _add_vocab(writer, vocab, pre, config["vocab_size"])
    for key, value in (extra or {}).items():
        writer.add_string(key, value) if isinstance(value, str) else writer.add_uint32(key, value)
    for index, (name, tensor) in enumerate(sorted(read_tensors(hf_dir).items())):
        target = gguf_name(name)
        data = tensor.float().numpy()
        if arch == "llama" and target.endswith(("attn_q.weight", "attn_q.bias")):
            data = llama_cpp_permute(data, heads)
        if arch == "llama" and target.endswith(("attn_k.weight", "attn_k.bias")):
            data = llama_cpp_permute(data, kv)
        qtype = types.get(target, Q.F32) if isinstance(types, dict) else types
        if data.ndim == 1:
            qtype = Q.F32
        if qtype == Q.F16:
            writer.add_tensor(target, data.astype(np.float16))
            continue
        if qtype == Q.BF16:
            raw = gguf.quants.quantize(data, Q.BF16)
            writer.add_tensor(target, raw, raw_shape=raw.shape, raw_dtype=Q.BF16)
            continue
        raw = _blocks(data, qtype, seed + index)
        if qtype == Q.F32:
            writer.add_tensor(target, raw)
        else:
            writer.add_tensor(target, raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_vocab(writer: gguf.GGUFWriter, kind: str, pre: str, size: int) -> None:
    tokens, types, merges, scores = (byte_level_vocab(size) if kind == "gpt2"
                                     else sentencepiece_vocab(size))
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
    else:
        writer.add_token_scores(scores)
        writer.add_unk_token_id(0)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(kind == "llama")
    writer.add_chat_template(CHAT_TEMPLATE)


def byte_level_vocab(size: int) -> tuple[list[str], list[int], list[str], list[float]]:
    """Specials, the 256 byte symbols, then merged words until ``size`` tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet]
    types = [3, 3, 3] + [1] * len(alphabet)
    merges: list[str] = []
    for word in [*SYMBOL_RUNS, *(s for w in WORDS for s in (w, "Ġ" + w))]:
        piece = word[0]
        for char in word[1:]:
            if len(tokens) >= size:
                break
            if piece + char not in tokens:
                merges.append(f"{piece} {char}")
                tokens.append(piece + char)
                types.append(1)
            piece += char
    while len(tokens) < size:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(5)
    return tokens, types, merges, []


def sentencepiece_vocab(size: int) -> tuple[list[str], list[int], list[str], list[float]]:
    """<unk>, <s>, </s>, the 256 byte tokens, then pieces of the words with falling scores."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    pieces = ["▁"] + [c for c in "abcdefghijklmnopqrstuvwxyz.,!?"]
    for word in WORDS:
        spelled = "▁" + word
        pieces += [spelled[:i] for i in range(2, len(spelled) + 1)]
    for piece in dict.fromkeys(pieces):
        if len(tokens) >= size:
            break
        tokens.append(piece)
        types.append(1)
        scores.append(-float(len(tokens)))
    while len(tokens) < size:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(5)
        scores.append(-1e9)
    return tokens, types, [], scores


def gguf_weights(path: Path) -> dict[str, torch.Tensor]:
    """What the GGUF holds, dequantized by ``gguf.quants``, in HF names and row order."""
    reader = gguf.GGUFReader(path)
    arch = str(reader.fields["general.architecture"].contents())
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv = int(reader.fields[f"{arch}.attention.head_count_kv"].contents())
    back = {gguf_name(n): n for n in _hf_names(reader)}
    out = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        values = np.asarray(values, dtype=np.float32).reshape(
            [int(n) for n in reversed(tensor.shape.tolist())])
        for part, count in (("attn_q", heads), ("attn_k", kv)):
            if arch == "llama" and f".{part}." in tensor.name:
                values = _unpermute(values, count)
        out[back[tensor.name]] = torch.from_numpy(values.copy())
    return out


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return (w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _hf_names(reader: gguf.GGUFReader) -> list[str]:
    names = []
    for tensor in reader.tensors:
        for hf, short in HF_TO_GGUF.items():
            if tensor.name == short:
                names.append(hf)
        if tensor.name.startswith("blk."):
            _, layer, part, kind = tensor.name.split(".")
            long = {v: k for k, v in LAYER_PARTS.items()}[part]
            names.append(f"model.layers.{layer}.{long}.{kind}")
    return names
