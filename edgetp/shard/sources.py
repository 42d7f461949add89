"""What a split was made from, by content: the source record that keeps a stale split unused.

A split depends on these files of the model directory:

- ``config.json``, the weight files and their index: their sha256 make the split's
  *fingerprint* (every manifest carries it, and the handshake compares it), so new weights
  saved in place, even of the same shapes and with the old modification time, make a new
  fingerprint, and the split no longer matches;
- the files copied into ``rank-0/`` for the master (:data:`COPIED_FILES`: the tokenizer, its
  config with the chat template, ``chat_template.jinja``, the generation config): a change
  there only needs them copied again.

Rank-0's ``.source.json`` records each file's sha256 with the stamp it had when it was hashed
(:mod:`edgetp.shard.stamps`), so checking a large checkpoint again costs one ``stat`` per
file: only a file whose stamp changed is read and hashed again, and its new stamp recorded
when its bytes turn out unchanged. The record is a hidden file, so shipping a rank directory
leaves it behind, as it does ``.verified.json``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from edgetp.model.checkpoint import INDEX_FILE, Checkpoint, CheckpointError
from edgetp.shard.stamps import FileStamp, settled_sha256

SOURCE_RECORD_NAME = ".source.json"
CONFIG_FILE = "config.json"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                "chat_template.jinja")


class SourceFile(BaseModel):
    """One model file: its sha256, and the stamp it had then (None: hash it every time)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: str
    stamp: FileStamp | None


class SourceRecord(BaseModel):
    """Every file a split depends on, by name (relative to the model directory)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["edgetp-split-source-1"] = "edgetp-split-source-1"
    weights: dict[str, SourceFile]  # config.json, the index, the weight files
    copied: dict[str, SourceFile]  # the files of COPIED_FILES the model has

    @property
    def fingerprint(self) -> str:
        """The model's identity: config, index and weights by content (32 hex digits)."""
        digest = hashlib.sha256()
        for name in sorted(self.weights):
            digest.update(f"{name}\0{self.weights[name].sha256}\n".encode())
        return digest.hexdigest()[:32]


@dataclass(frozen=True)
class SourceCheck:
    record: SourceRecord  # the model's files as they are now
    rehashed: tuple[str, ...]  # files read and hashed this time (stamp new or changed)


def weight_sources(model_dir: Path) -> list[str]:
    """The files that make the fingerprint: config.json, the index if any, every weight file."""
    index = [INDEX_FILE] if (model_dir / INDEX_FILE).is_file() else []
    return [CONFIG_FILE, *index, *sorted(set(Checkpoint(model_dir).weight_map.values()))]


def check_sources(model_dir: Path, previous: SourceRecord | None) -> SourceCheck:
    """The model's files now, hashing only those whose stamp differs from ``previous``'s."""
    rehashed: list[str] = []

    def identify(name: str, known: dict[str, SourceFile]) -> SourceFile:
        path = model_dir / name
        old = known.get(name)
        if old is not None and old.stamp is not None and old.stamp == _stamp_or_none(path):
            return old
        rehashed.append(name)
        try:
            sha256, stamp = settled_sha256(path)
        except FileNotFoundError as exc:
            raise CheckpointError(f"{path} is missing: the model directory is incomplete") from exc
        return SourceFile(sha256=sha256, stamp=stamp)

    weights = previous.weights if previous else {}
    copied = previous.copied if previous else {}
    record = SourceRecord(
        weights={name: identify(name, weights) for name in weight_sources(model_dir)},
        copied={name: identify(name, copied) for name in COPIED_FILES
                if (model_dir / name).is_file()},
    )
    return SourceCheck(record, tuple(rehashed))


def _stamp_or_none(path: Path) -> FileStamp | None:
    try:
        return FileStamp.of(path)
    except OSError:
        return None


def changed(old: dict[str, SourceFile], new: dict[str, SourceFile]) -> list[str]:
    """Names whose content differs between two records' groups (added and removed included)."""
    return sorted(name for name in old.keys() | new.keys()
                  if (old.get(name) and old[name].sha256) != (new.get(name) and new[name].sha256))


def read_source_record(rank0_dir: Path) -> SourceRecord | None:
    """Rank-0's source record, or None if it is missing or unreadable (hash everything)."""
    try:
        return SourceRecord.model_validate_json((rank0_dir / SOURCE_RECORD_NAME).read_bytes())
    except (OSError, ValidationError):
        return None


def write_source_record(rank0_dir: Path, record: SourceRecord) -> None:
    """Write atomically (a reader sees the old record or the new one)."""
    tmp = rank0_dir / (SOURCE_RECORD_NAME + ".tmp")
    tmp.write_text(record.model_dump_json(indent=1))
    os.replace(tmp, rank0_dir / SOURCE_RECORD_NAME)
