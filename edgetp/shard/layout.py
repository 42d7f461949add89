"""The layout of a split directory: one ``rank-K/`` shard directory per rank.

::

    SPLIT/
      rank-0/   manifest.json, layer-000.safetensors ..., embed.safetensors, head.safetensors,
                and the tokenizer files (the master's shard)
      rank-1/   manifest.json, layer-XXX.safetensors (its slices of the shared layers)
      ...

Every path to a rank directory or a layer file is built here, and every rank directory name is
parsed here; what each file holds is the manifest's business (:mod:`edgetp.shard.manifest`).
"""

from __future__ import annotations

import re
from pathlib import Path

from edgetp.shard.manifest import MANIFEST_NAME

RANK_DIR_PREFIX = "rank-"
_RANK_DIR_NAME = re.compile(rf"{RANK_DIR_PREFIX}(\d+)")


def rank_dir(split_dir: Path, rank: int) -> Path:
    """Where rank ``rank``'s shard lives in ``split_dir``."""
    return split_dir / f"{RANK_DIR_PREFIX}{rank}"


def rank_of(path: str | Path) -> int | None:
    """The rank of a directory named like a rank directory (``rank-K``), else None."""
    match = _RANK_DIR_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def rank_dirs(split_dir: Path) -> list[Path]:
    """The rank directories of ``split_dir`` that hold a manifest, sorted by name."""
    return sorted(manifest.parent
                  for manifest in split_dir.glob(f"{RANK_DIR_PREFIX}*/{MANIFEST_NAME}"))


def shard_dir_of(path: Path, rank: int = 0) -> Path:
    """``path``'s rank directory if ``path`` is a split directory that has one, else ``path``
    itself (taken to be a shard directory already)."""
    candidate = rank_dir(path, rank)
    return candidate if candidate.is_dir() else path


def layer_file(index: int) -> str:
    """The file of a rank directory that holds its slice of layer ``index``."""
    return f"layer-{index:03d}.safetensors"
