"""How the splitter stores each tensor: in a float dtype, or quantized next to its scales.

:class:`TensorStore` is used by ``edgetp.shard.split`` tensor by tensor, so memory stays at one
slice (plus its float32 copy while it is quantized). Linear weights (q/k/v/o, gate/up/down,
lm_head) are quantized; norms, the embedding and biases stay in the float dtype (the
checkpoint's). Formats: ``edgetp.shard.quant``. A model converted from a GGUF gives its Q4_0/Q4_1
and Q8_0 matrices from the file's own blocks where they map (``edgetp.shard.gguf_blocks``).
"""

from __future__ import annotations

import torch

from edgetp.config.model import ModelConfig
from edgetp.core.errors import ConfigError
from edgetp.model.checkpoint import Checkpoint, hf_name
from edgetp.shard.gguf_blocks import GGUFBlocks
from edgetp.shard.manifest import FileEntry, Manifest
from edgetp.shard.plan import ShardPlan, TensorSlice, layer_slices
from edgetp.shard.quant import (
    INT4_GROUP_SIZES,
    QUANT_DTYPES,
    SCALE_SUFFIX,
    int4_group,
    int8_blocked,
    is_quantized_weight,
    quantize_int4,
    quantize_int8,
    quantize_int8_blocks,
    row_amax,
)


class TensorStore:
    """Converts the tensors of one split; ``fmt`` is a float dtype name, ``int8`` or ``int4``,
    and ``head_fmt`` the lm_head's (:func:`~edgetp.shard.quant.head_format`; default ``fmt``).
    """

    def __init__(self, fmt: str, float_dtype: torch.dtype, group_size: int,
                 checkpoint: Checkpoint, config: ModelConfig, plan: ShardPlan,
                 head_fmt: str | None = None) -> None:
        self.fmt = fmt
        self.head_fmt = head_fmt or fmt
        self.float_dtype = float_dtype
        self.checkpoint = checkpoint
        self.plan = plan
        self.quantized = fmt in QUANT_DTYPES
        self.head_quantized = self.head_fmt in QUANT_DTYPES
        int4 = "int4" in (fmt, self.head_fmt)
        self.group_size = group_size if int4 else 0
        if int4 and group_size not in INT4_GROUP_SIZES:
            raise ConfigError(f"--group-size {group_size}: choose one of "
                              f"{', '.join(map(str, INT4_GROUP_SIZES))}")
        self._slices = [layer_slices(plan, r, config) for r in range(plan.n_ranks)]
        self.groups = int4_groups(config, plan, group_size) if fmt == "int4" else {}
        if self.head_fmt == "int4":
            self.groups["lm_head.weight"] = int4_group([config.hidden_size], group_size,
                                                       "lm_head.weight")
        self.int8_blocks = int8_block_names(config, plan)
        self._row_amax: dict[str, torch.Tensor] = {}  # this layer's row-parallel amax, int8
        self.native = (GGUFBlocks(checkpoint.model_dir)
                       if self.quantized or self.head_quantized else None)

    def format_of(self, name: str) -> str:
        """How tensor ``name`` of a layer or the master's files is stored."""
        if not is_quantized_weight(name):
            return "float"
        return self.head_fmt if name.startswith("lm_head.") else self.fmt

    def convert(self, layer: int | None, name: str, part: TensorSlice,
                tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors to store for ``name`` (``layer`` None for master-only tensors)."""
        fmt = self.format_of(name)
        if fmt not in QUANT_DTYPES:  # a float head is in the split's float dtype too
            return {name: tensor.to(self.float_dtype).contiguous()}
        group = self.groups.get(name, self.group_size)
        if self.native is not None:
            source = hf_name(name if layer is None else f"layers.{layer}.{name}")
            kept = self.native.convert(fmt, source, part, group, tensor)
            if kept is not None:
                return {name + suffix: value for suffix, value in kept.items()}
        if fmt == "int8" and self.int8_blocks.get(name, True):
            q, scale = quantize_int8_blocks(tensor)
        elif fmt == "int8":
            amax = self.row_amax(layer, name) if part.dim == 1 else None
            q, scale = quantize_int8(tensor, amax)
        else:
            q, scale = quantize_int4(tensor, group)
        return {name: q, name + SCALE_SUFFIX: scale}

    def row_amax(self, layer: int | None, name: str) -> torch.Tensor:
        """amax over the whole row of a row-parallel weight, read slice by slice (int8 scales
        then do not depend on the node count). Cached for the layer being written."""
        key = f"{layer}.{name}"
        if key not in self._row_amax:
            self._row_amax = {k: v for k, v in self._row_amax.items()
                              if k.startswith(f"{layer}.")}
            source = hf_name(f"layers.{layer}.{name}")
            amax = None
            for slices in self._slices:
                part = slices[name]
                piece = self.checkpoint.get_slice(source, 1, part.start, part.stop)
                piece_amax = row_amax(piece)  # [out]
                amax = piece_amax if amax is None else torch.maximum(amax, piece_amax)
            self._row_amax[key] = amax  # type: ignore[assignment]
        return self._row_amax[key]


def slice_widths(config: ModelConfig, plan: ShardPlan) -> dict[str, list[int]]:
    """Per quantized tensor name, the input widths its quantization must respect: every rank's
    slice of a row-parallel weight and the whole width, else the hidden size."""
    slices = [layer_slices(plan, r, config) for r in range(plan.n_ranks)]
    full = {"self_attn.o_proj.weight": config.num_attention_heads * config.head_dim,
            "mlp.down_proj.weight": config.intermediate_size}
    widths = {"lm_head.weight": [config.hidden_size]}
    for name in slices[0]:
        if not is_quantized_weight(name):
            continue
        if name in full:  # row-parallel: the input is split
            widths[name] = [s[name].stop - s[name].start for s in slices] + [full[name]]
        else:
            widths[name] = [config.hidden_size]
    return widths


def int8_block_names(config: ModelConfig, plan: ShardPlan) -> dict[str, bool]:
    """Per quantized tensor name, whether int8 stores it in blocks (else one scale a row)."""
    return {name: int8_blocked(w) for name, w in slice_widths(config, plan).items()}


def int4_groups(config: ModelConfig, plan: ShardPlan, group_size: int) -> dict[str, int]:
    """Per quantized tensor name, its int4 group: it must divide every rank's slice width."""
    return {name: int4_group(w, group_size, name)
            for name, w in slice_widths(config, plan).items()}


def shrunk_groups(manifest: Manifest) -> dict[str, int]:
    """For an int4 split: the tensors whose group is smaller than requested, and their group."""
    if manifest.dtype != "int4":
        return {}
    layers = sorted(n for n in manifest.files if n.startswith("layer-"))
    tensors = {**(manifest.files[layers[0]].tensors if layers else {}),
               **manifest.files.get("head.safetensors", FileEntry(0, "", {})).tensors}
    out = {}
    for name, entry in tensors.items():
        scale = tensors.get(name + SCALE_SUFFIX)
        if is_quantized_weight(name) and scale is not None:
            group = 2 * entry.shape[1] // scale.shape[0]
            if group != manifest.group_size:
                out[name.removesuffix(".weight")] = group
    return out
