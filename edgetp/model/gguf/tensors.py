"""GGUF tensors as Hugging Face tensors: their names, their row order, their values.

llama.cpp names tensors ``blk.N.attn_q.weight``, ``token_embd.weight`` ...;
:func:`hf_name` gives the Hugging Face name of each one a Llama or Qwen2 model has. Its
converter also reorders the rows of a Llama model's Q and K projections (within each head,
the two halves of the rotary pairs interleaved, as its RoPE wants), not Qwen2's;
:func:`row_order` gives, for each Hugging Face row, the GGUF row that holds it.

GGUF stores a matrix ``[rows, columns]`` with its shape reversed (``ne = [columns, rows]``) and
each row as whole quantization blocks along the columns, so rows can be read and dequantized
independently: :func:`read_rows` dequantizes any set of rows with ``gguf.quants``.
"""

from __future__ import annotations

import re

import gguf
import numpy as np
import torch

from edgetp.model.gguf.reader import GGUFError

T = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K,
                   T.Q5_K, T.Q6_K)
FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
IGNORED = ("rope_freqs.weight",)  # llama3 RoPE factors: read into config.json instead
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(name: str) -> str | None:
    """The Hugging Face name of GGUF tensor ``name``; None for one that is not stored."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    if name in IGNORED:
        return None
    match = _LAYER.fullmatch(name)
    if match is None or match.group(2) not in LAYER_NAMES:
        raise GGUFError(f"tensor {name!r} is not part of a Llama or Qwen2 model",
                        "edgetp converts the architectures llama and qwen2")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}"


def check_type(tensor: gguf.ReaderTensor) -> None:
    if tensor.tensor_type not in SUPPORTED_TYPES:
        raise GGUFError(
            f"tensor {tensor.name} is of type {tensor.tensor_type.name}, which edgetp does not "
            f"convert", f"supported: {', '.join(t.name for t in SUPPORTED_TYPES)}")


def hf_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    """The tensor's shape in torch order (GGUF lists it innermost first)."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def permuted_heads(name: str, architecture: str, heads: int, kv_heads: int) -> int:
    """How many heads llama.cpp reordered ``name``'s rows over (0: not reordered)."""
    if architecture != "llama":
        return 0
    if name.endswith(("attn_q.weight", "attn_q.bias")):
        return heads
    if name.endswith(("attn_k.weight", "attn_k.bias")):
        return kv_heads
    return 0


def row_order(rows: int, heads: int) -> np.ndarray:
    """For each Hugging Face row, the GGUF row holding it (``heads`` 0: the identity).

    llama.cpp stores row ``(h, half, i)`` of a head (``half`` 0/1 of the rotary pairs, ``i``
    within the half) at ``(h, i, half)``; this is the inverse of that reordering.
    """
    index = np.arange(rows)
    if not heads:
        return index
    if rows % (2 * heads):
        raise GGUFError(f"{rows} rows do not split into {heads} heads of rotary pairs")
    half = rows // heads // 2
    return index.reshape(heads, half, 2).swapaxes(1, 2).reshape(rows)


def read_rows(tensor: gguf.ReaderTensor, rows: np.ndarray | slice) -> torch.Tensor:
    """GGUF rows ``rows`` of a matrix (or a vector, ``rows`` ignored), dequantized to float32
    or left in their float type. -> [len(rows), columns] (a vector: [n])."""
    data = tensor.data  # memmap: [rows, bytes per row] for block types, [rows, cols] floats
    if len(tensor.shape) == 1:
        picked = np.asarray(data)
    else:
        picked = np.asarray(data[rows])  # reads only these rows
    if tensor.tensor_type in (T.F32, T.F16):
        return torch.from_numpy(picked.copy())
    if tensor.tensor_type == T.BF16:  # stored as raw 16-bit words
        return torch.from_numpy(picked.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(gguf.quants.dequantize(picked, tensor.tensor_type))
