"""The manifest of one rank's shard directory: what the files are and how to check them.

``rank-K/manifest.json`` records the model (config and fingerprint), the shard plan, the
stored dtype, and for every file its size, sha256 and each tensor's absolute byte range
(so the window can read a tensor straight from disk into a buffer).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetp.config.model import ModelConfig
from edgetp.core.errors import ShardError
from edgetp.core.files import read_json
from edgetp.shard.plan import ShardPlan

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "edgetp-shard"
MANIFEST_VERSION = 1
HASH_CHUNK = 4 << 20


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors dtype code, e.g. "F32"
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # absolute byte range in the file


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str
    tensors: dict[str, TensorEntry]


@dataclass
class Manifest:
    rank: int
    fingerprint: str
    dtype: str
    model_config: ModelConfig
    plan: ShardPlan
    files: dict[str, FileEntry] = field(default_factory=dict)
    group_size: int = 0  # int4: the requested group (per tensor: in / scale.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "rank": self.rank,
            "n_ranks": self.plan.n_ranks,
            "fingerprint": self.fingerprint,
            "dtype": self.dtype,
            **({"group_size": self.group_size} if self.group_size else {}),
            "model_config": self.model_config.to_dict(),
            "plan": self.plan.to_dict(),
            "files": {
                name: {
                    "size": f.size,
                    "sha256": f.sha256,
                    "tensors": {
                        t: {"dtype": e.dtype, "shape": list(e.shape), "offsets": list(e.offsets)}
                        for t, e in f.tensors.items()
                    },
                }
                for name, f in self.files.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = MANIFEST_NAME) -> Manifest:
        if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
            raise ShardError(
                f"{source} is not an edgetp shard manifest of version {MANIFEST_VERSION}; "
                "split the model again with `edgetp split`"
            )
        try:
            files = {
                name: FileEntry(
                    int(f["size"]),
                    str(f["sha256"]),
                    {
                        t: TensorEntry(str(e["dtype"]), tuple(e["shape"]), tuple(e["offsets"]))
                        for t, e in f["tensors"].items()
                    },
                )
                for name, f in data["files"].items()
            }
            return cls(
                rank=int(data["rank"]),
                fingerprint=str(data["fingerprint"]),
                dtype=str(data["dtype"]),
                model_config=ModelConfig.from_dict(data["model_config"]),
                plan=ShardPlan.from_dict(data["plan"]),
                files=files,
                group_size=int(data.get("group_size", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardError(f"{source} is malformed ({exc!r}); split the model again") from exc

    def write(self, directory: Path) -> None:
        """Write atomically: a manifest exists only once every file it names is complete."""
        tmp = directory / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))
        os.replace(tmp, directory / MANIFEST_NAME)


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    data = read_json(path, "shard manifest", ShardError, f"{directory} is not a complete shard "
                     "directory: split the model (again) with `edgetp split MODEL_DIR --nodes N "
                     "--out DIR`")
    return Manifest.from_dict(data, str(path))


def sha256_file(path: Path) -> str:
    """Hash a file, leaving no page cache behind (so memory figures stay honest)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return digest.hexdigest()


def verify_file(directory: Path, name: str, entry: FileEntry, check_hash: bool = True) -> None:
    """Raise :class:`ShardError` naming the file if it is missing, truncated or altered."""
    path = directory / name
    if not path.is_file():
        raise ShardError(f"shard file {path} is missing; copy the rank directory again or re-split")
    size = path.stat().st_size
    if size != entry.size:
        raise ShardError(
            f"shard file {path} has {size} bytes, the manifest says {entry.size}: it is "
            "truncated or was replaced; copy it again or re-split"
        )
    if check_hash and sha256_file(path) != entry.sha256:
        raise ShardError(
            f"shard file {path} fails its sha256 check: it is corrupted; copy it again or re-split"
        )


VERIFIED_NAME = ".verified.json"


def verify_directory(directory: Path, manifest: Manifest, check_hash: bool = True) -> None:
    """Verify every file of a shard directory; hash only files not verified before at their
    current size and modification time (the record lives in ``.verified.json``)."""
    record_path = directory / VERIFIED_NAME
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    fresh = {}
    for name, entry in manifest.files.items():
        path = directory / name
        stamp = None
        if path.is_file():
            stat = path.stat()
            stamp = [entry.sha256, stat.st_size, stat.st_mtime_ns]
        known = stamp is not None and record.get(name) == stamp
        verify_file(directory, name, entry, check_hash=check_hash and not known)
        fresh[name] = stamp
    if check_hash and fresh != record:
        try:
            record_path.write_text(json.dumps(fresh))
        except OSError:
            pass  # a read-only shard directory is verified again next time


def tensor_entries(blob: bytes | memoryview) -> dict[str, TensorEntry]:
    """Parse a serialised safetensors file's header into absolute tensor byte ranges."""
    (header_len,) = struct.unpack("<Q", bytes(blob[:8]))
    header = json.loads(bytes(blob[8 : 8 + header_len]))
    base = 8 + header_len
    return {
        name: TensorEntry(
            info["dtype"],
            tuple(info["shape"]),
            (base + info["data_offsets"][0], base + info["data_offsets"][1]),
        )
        for name, info in header.items()
        if name != "__metadata__"
    }
