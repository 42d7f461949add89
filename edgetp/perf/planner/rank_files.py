"""The weight files ``edgetp split`` writes for one rank, tensor by tensor, without writing them.

Shapes come from the same :func:`~edgetp.shard.plan.layer_slices` and
:func:`~edgetp.shard.plan.master_tensors` the splitter uses, stored as
:mod:`edgetp.shard.quant`'s formats for int8/int4; :func:`safetensors_size` is the size of the
file ``save_file`` would write for them.
"""

from __future__ import annotations

import json
import math
from typing import Any

from edgetp.config.model import ModelConfig
from edgetp.perf.planner.storage import Storage
from edgetp.shard.layout import layer_file
from edgetp.shard.plan import ShardPlan, layer_slices, master_tensors
from edgetp.shard.quant import (
    INT8_BLOCK,
    QUANT_DTYPES,
    SCALE_SUFFIX,
    int4_group,
    is_quantized_weight,
)
from edgetp.shard.quantsplit import int4_groups, int8_block_names

SAFETENSORS_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
CODE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1}

Shapes = dict[str, tuple[tuple[int, ...], str]]  # tensor -> (shape, safetensors dtype code)
FLOAT32_STORAGE = Storage()  # a float32 split computed in float32


def rank_files(config: ModelConfig, plan: ShardPlan, rank: int,
               storage: Storage = FLOAT32_STORAGE) -> dict[str, Shapes]:
    """File name -> tensor -> (shape, dtype code), for every weight file ``split`` writes."""
    full = _full_shapes(config)
    groups = int4_groups(config, plan, storage.group_size) if storage.weights == "int4" else {}
    if storage.head_format == "int4":
        groups["lm_head.weight"] = int4_group([config.hidden_size], storage.group_size)
    blocked = int8_block_names(config, plan)
    parts = layer_slices(plan, rank, config)
    sliced = _stored({name: part.shape_of(full[name]) for name, part in parts.items()},
                     storage, groups, blocked)
    whole = _stored({name: full[name] for name in parts}, storage, groups, blocked)
    files: dict[str, Shapes] = {}
    for layer in range(config.num_hidden_layers):
        if not plan.is_private(layer):
            files[layer_file(layer)] = sliced
        elif rank == 0:
            files[layer_file(layer)] = whole
    if rank == 0:
        for stem, names in master_tensors(config).items():
            if stem == "head" and storage.head_quantized and "lm_head.weight" not in names:
                names = [*names, "lm_head.weight"]  # a quantized head is stored, tied or not
            files[f"{stem}.safetensors"] = _stored({n: full[n] for n in names}, storage, groups,
                                                   blocked)
    return files


def _full_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a layer or the master's files may hold, unsliced."""
    d, hd, inner = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (q, d), "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.weight": (kv, d), "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.weight": (kv, d), "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.weight": (d, q), "self_attn.o_proj.bias": (d,),
            "mlp.gate_proj.weight": (inner, d), "mlp.gate_proj.bias": (inner,),
            "mlp.up_proj.weight": (inner, d), "mlp.up_proj.bias": (inner,),
            "mlp.down_proj.weight": (d, inner), "mlp.down_proj.bias": (d,),
            "embed_tokens.weight": (config.vocab_size, d), "norm.weight": (d,),
            "lm_head.weight": (config.vocab_size, d)}


def _stored(shapes: dict[str, tuple[int, ...]], storage: Storage,
            groups: dict[str, int], blocked: dict[str, bool]) -> Shapes:
    """Logical shapes -> what the splitter writes (edgetp.shard.quant's formats for int8/int4)."""
    out: Shapes = {}
    float_code = SAFETENSORS_CODES[storage.floats]
    for name, shape in shapes.items():
        fmt = storage.head_format if name.startswith("lm_head.") else storage.weights
        if not (fmt in QUANT_DTYPES and is_quantized_weight(name)):
            out[name] = (shape, float_code)
        elif fmt == "int8" and blocked.get(name, True):  # I8, F16 (scale, low) per block
            out[name] = (shape, "I8")
            out[name + SCALE_SUFFIX] = ((2, shape[0], shape[1] // INT8_BLOCK), "F16")
        elif fmt == "int8":  # I8 [out, in], BF16 scale [out]
            out[name] = (shape, "I8")
            out[name + SCALE_SUFFIX] = ((shape[0],), "BF16")
        else:  # U8 [out, in / 2], BF16 (scale, zero) [in / group, out, 2]
            out[name] = ((shape[0], shape[1] // 2), "U8")
            out[name + SCALE_SUFFIX] = ((shape[1] // groups[name], shape[0], 2), "BF16")
    return out


def tensor_bytes(shape: tuple[int, ...], code: str) -> int:
    """The bytes of one tensor's data."""
    return math.prod(shape) * CODE_BYTES[code]


def safetensors_size(shapes: Shapes) -> int:
    """The size of the file ``save_file`` writes for these tensors and edgetp's metadata:
    8-byte length, JSON header padded to 8 bytes, data by element size (largest first), then
    by name (the offsets' digits count in the header)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "producer": "edgetp"}}
    offset = 0
    for name in sorted(shapes, key=lambda n: (-CODE_BYTES[shapes[n][1]], n)):
        shape, code = shapes[name]
        nbytes = tensor_bytes(shape, code)
        header[name] = {"dtype": code, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    length = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + length + (-length % 8) + offset
