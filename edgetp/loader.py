"""Building one rank's share of the model from its own shard directory alone.

A worker needs nothing but ``rank-K/``: the manifest gives the model config and the plan, the
layer files give its slices. Every file is checked against the manifest (size and sha256)
before its tensors are used, so a corrupted shard is an error naming the file, not wrong output.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from edgetp.checkpoint import set_tensor
from edgetp.collectives import Communicator
from edgetp.manifest import Manifest, read_manifest, verify_file
from edgetp.model import Transformer
from edgetp.parallel import shard_model
from edgetp.split import layer_file


def load_rank(
    shard_dir: str | Path,
    comm: Communicator,
    dtype: torch.dtype = torch.float32,
    max_seq_len: int | None = None,
    verify: bool = True,
) -> Transformer:
    """Rank ``manifest.rank``'s share, ready to run with ``comm``; KV cache allocated."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    if comm.rank != manifest.rank:
        raise ValueError(
            f"{shard_dir} holds rank {manifest.rank}'s shard but this node is rank {comm.rank}"
        )
    with torch.device("meta"):
        model = Transformer(manifest.model_config, max_seq_len=max_seq_len)
    shard_model(model, manifest.plan, manifest.rank, comm)
    for index in range(manifest.model_config.num_hidden_layers):
        if manifest.plan.is_private(index) and manifest.rank != 0:
            continue
        _load_file(model, shard_dir, manifest, layer_file(index), f"layers.{index}.", dtype, verify)
    if manifest.rank == 0:
        for name in ("embed.safetensors", "head.safetensors"):
            _load_file(model, shard_dir, manifest, name, "", dtype, verify)
        if manifest.model_config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
    model.allocate_cache(dtype)
    return model.eval()


def _load_file(
    model: Transformer,
    shard_dir: Path,
    manifest: Manifest,
    file_name: str,
    prefix: str,
    dtype: torch.dtype,
    verify: bool,
) -> None:
    entry = manifest.files.get(file_name)
    if entry is None:
        raise ValueError(f"{shard_dir}/manifest.json does not list {file_name}; re-split")
    verify_file(shard_dir, file_name, entry, check_hash=verify)
    with safe_open(shard_dir / file_name, framework="pt") as handle:
        for name in entry.tensors:
            tensor = handle.get_tensor(name).to(dtype)
            set_tensor(model, prefix + name, tensor, f" in {shard_dir / file_name}")
