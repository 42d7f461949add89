"""The layout of a split directory: one ``rank-K/`` shard directory per rank.

::

    SPLIT/
      rank-0/   manifest.json, layer-000.safetensors ..., embed.safetensors, head.safetensors,
                and the tokenizer files (the master's shard)
      rank-1/   manifest.json, layer-XXX.safetensors (its slices of the shared layers)
      ...

Every path to a rank directory or a layer file is built here, and every rank directory name is
parsed here; what each file holds is the manifest's business (:mod:`edgetp.shard.manifest`).
The names a split writes are listed here too (:func:`is_split_file`): a rank directory holds
those and nothing else, so whatever copies one (``edgetp launch``) refuses any other name a
manifest might carry (``../x``, ``/home/me/.ssh/id_rsa``) instead of reading or writing it.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgetp.shard.manifest import MANIFEST_NAME

RANK_DIR_PREFIX = "rank-"
_RANK_DIR_NAME = re.compile(rf"{RANK_DIR_PREFIX}(\d+)")
MASTER_FILES = ("embed.safetensors", "head.safetensors")  # rank 0 only
CHECKPOINT_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                    "chat_template.jinja", "config.json")  # copied to rank 0 when present
_LAYER_FILE = r"layer-[0-9]{3,}\.safetensors"
# every name a split writes into a rank directory, as one pattern (edgetp.ops.remote, which
# runs on nodes without edgetp, holds a copy; tests/unit/ops/test_remote.py keeps them equal)
SPLIT_FILE = re.compile("|".join([_LAYER_FILE, *(re.escape(name) for name in
                                                 (MANIFEST_NAME, *MASTER_FILES,
                                                  *CHECKPOINT_FILES))]))


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


def is_split_file(name: object) -> bool:
    """Whether ``name`` is the name of a file a split writes into a rank directory: a bare
    name (never a path) of a layer file, the manifest, rank 0's embedding, head or checkpoint
    files."""
    return isinstance(name, str) and SPLIT_FILE.fullmatch(name) is not None
