"""Reading Hugging Face checkpoints tensor by tensor (never the whole checkpoint at once).

A model directory holds either ``model.safetensors`` or ``model.safetensors.index.json`` plus
the shard files it names. :class:`Checkpoint` opens them lazily (safetensors memory-maps the
file) and yields one tensor at a time, so peak memory is the largest tensor, not the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from edgetp.config.model import ModelConfig, load_model_config
from edgetp.core.errors import ModelError
from edgetp.core.files import read_json
from edgetp.core.pages import pack
from edgetp.model.context import default_context, whole_model_bytes_per_position
from edgetp.model.llama import Transformer

T = TypeVar("T")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ModelError):
    """The checkpoint on disk is missing, incomplete or of an unsupported kind."""


class Checkpoint:
    """A Hugging Face model directory's tensors, by name, read one at a time."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.weight_map = _read_weight_map(self.model_dir)  # tensor name -> file name

    @property
    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def file_of(self, name: str) -> Path:
        if name not in self.weight_map:
            raise CheckpointError(
                f"tensor {name!r} is missing from the checkpoint in {self.model_dir}; "
                "the download may be incomplete or the model is not a supported Llama variant"
            )
        return self.model_dir / self.weight_map[name]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor in its stored dtype)."""
        with _open(self.file_of(name)) as handle:
            return _checked(name, _read(handle, name, lambda: handle.get_tensor(name)))

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Read rows/columns [start, stop) of a tensor along ``dim`` without reading the rest."""
        with _open(self.file_of(name)) as handle:
            view = _read(handle, name, lambda: handle.get_slice(name))
            index = [slice(None)] * len(view.get_shape())
            index[dim] = slice(start, stop)
            return _checked(name, view[tuple(index)])

    def shape_of(self, name: str) -> list[int]:
        with _open(self.file_of(name)) as handle:
            return list(_read(handle, name, lambda: handle.get_slice(name)).get_shape())

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time, file by file."""
        by_file: dict[str, list[str]] = {}
        for name, file_name in self.weight_map.items():
            by_file.setdefault(file_name, []).append(name)
        for file_name in sorted(by_file):
            with _open(self.model_dir / file_name) as handle:
                for name in sorted(by_file[file_name]):
                    tensor = _read(handle, name, partial(handle.get_tensor, name))
                    yield name, _checked(name, tensor)


def _open(path: Path):  # noqa: ANN202 - safetensors' handle type is private
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or "
            "corrupted: download it again"
        ) from exc


def _read(handle: object, name: str, read: Callable[[], T]) -> T:
    try:
        return read()
    except SafetensorError as exc:
        raise CheckpointError(
            f"cannot read tensor {name!r} ({exc}); the checkpoint or its index is inconsistent"
        ) from exc


def _checked(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise CheckpointError(
            f"tensor {name!r} has dtype {tensor.dtype}; supported: float32, float16, bfloat16"
        )
    return tensor


def _read_weight_map(model_dir: Path) -> dict[str, str]:
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = read_json(index_path, "safetensors index", CheckpointError)["weight_map"]
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path} is not a valid safetensors index: {exc}") from exc
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise CheckpointError(
                f"{index_path} names shard files that are missing: {', '.join(missing)}"
            )
        return dict(weight_map)
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with _open(single) as handle:
            return {name: SINGLE_FILE for name in handle.keys()}
    raise CheckpointError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}; edgetp reads Hugging Face "
        "safetensors checkpoints (convert .bin checkpoints with transformers first)"
    )


def hf_name(param_name: str) -> str:
    """Our parameter name -> the Hugging Face checkpoint name."""
    return param_name if param_name.startswith("lm_head.") else f"model.{param_name}"


def expected_tensor_names(config: ModelConfig) -> list[str]:
    """Every checkpoint tensor a model of this config needs."""
    return [hf_name(name) for name in _param_names(config)]


def _param_names(config: ModelConfig) -> list[str]:
    names = ["embed_tokens.weight", "norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(f"{p}self_attn.{proj}.weight")
        if config.qkv_bias:
            names += [f"{p}self_attn.{proj}.bias" for proj in ("q_proj", "k_proj", "v_proj")]
        if config.o_bias:
            names.append(f"{p}self_attn.o_proj.bias")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.append(f"{p}mlp.{proj}.weight")
            if config.mlp_bias:
                names.append(f"{p}mlp.{proj}.bias")
    return names


def set_tensor(model: nn.Module, param_name: str, value: torch.Tensor, source: str = "") -> None:
    """Replace parameter ``param_name`` of ``model`` by ``value`` (no copy of the old one).

    The new tensor must have the shape the model was built with (``meta`` shapes count).
    """
    owner_name, _, attr = param_name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    expected = tuple(owner.get_parameter(attr).shape)
    if tuple(value.shape) != expected:
        raise CheckpointError(
            f"tensor {param_name!r}{source} has shape {list(value.shape)} but the config "
            f"implies {list(expected)}; config.json does not match the weights"
        )
    owner.register_parameter(attr, nn.Parameter(value, requires_grad=False))


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    max_seq_len: int | None = None,
) -> Transformer:
    """Build the single-device model from a Hugging Face directory, tensor by tensor.

    ``max_seq_len`` None: as much of the model's context as this node's memory holds
    (:func:`~edgetp.model.context.default_context`).
    """
    config = load_model_config(model_dir)
    checkpoint = Checkpoint(model_dir)
    if max_seq_len is None:
        per_position = whole_model_bytes_per_position(config, dtype.itemsize)
        max_seq_len = default_context(config, per_position)
    with torch.device("meta"):
        model = Transformer(config, max_seq_len=max_seq_len)
    for name in _param_names(config):  # each copied out of the file's mapping, in huge pages
        weight = pack([checkpoint.get(hf_name(name)).to(dtype)])[0]
        set_tensor(model, name, weight, f" in {model_dir}")
    if config.tie_word_embeddings:
        model.tie_head_to_embedding()
    model.allocate_cache(dtype)
    return model.eval()
