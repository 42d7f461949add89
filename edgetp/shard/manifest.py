"""The manifest of one rank's shard directory: what the files are and how to check them.

``rank-K/manifest.json`` records the model (config and fingerprint), the shard plan, the
stored dtype, and for every file its size, sha256 and each tensor's absolute byte range
(so the window can read a tensor straight from disk into a buffer) with the xxh3_64 checksums
of its bytes (:mod:`edgetp.shard.checksums`: what a re-read is checked against). Manifests
written before the checksums existed still load; their tensors have none.
"""

from __future__ import annotations

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
from edgetp.shard.stamps import FileStamp, settled_sha256

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "edgetp-shard"
MANIFEST_VERSION = 1  # new fields are optional, so older readers still take newer manifests


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors dtype code, e.g. "F32"
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # absolute byte range in the file
    xxh3: tuple[int, ...] = ()  # xxh3_64 of the bytes, per chunk; () in older manifests
    xxh3_chunk: int = 0  # bytes per checksum (the last chunk may be shorter); 0: one for all

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape),
                               "offsets": list(self.offsets)}
        if self.xxh3:
            out["xxh3_64"] = "".join(f"{digest:016x}" for digest in self.xxh3)
        if self.xxh3_chunk:
            out["xxh3_64_chunk"] = self.xxh3_chunk
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorEntry:
        digests = str(data.get("xxh3_64", ""))
        if len(digests) % 16:
            raise ValueError(f"xxh3_64 has {len(digests)} hex digits, not a multiple of 16")
        return cls(str(data["dtype"]), tuple(data["shape"]), tuple(data["offsets"]),
                   tuple(int(digests[i : i + 16], 16) for i in range(0, len(digests), 16)),
                   int(data.get("xxh3_64_chunk", 0)))


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
    head_dtype: str = ""  # the lm_head's: int8, int4 or a float dtype; "": as ``dtype``

    @property
    def head_format(self) -> str:
        """How the lm_head is stored (older manifests: like the layers)."""
        return self.head_dtype or self.dtype

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "rank": self.rank,
            "n_ranks": self.plan.n_ranks,
            "fingerprint": self.fingerprint,
            "dtype": self.dtype,
            **({"group_size": self.group_size} if self.group_size else {}),
            "head_dtype": self.head_format,
            "model_config": self.model_config.to_dict(),
            "plan": self.plan.to_dict(),
            "files": {
                name: {
                    "size": f.size,
                    "sha256": f.sha256,
                    "tensors": {t: e.to_dict() for t, e in f.tensors.items()},
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
                    {t: TensorEntry.from_dict(e) for t, e in f["tensors"].items()},
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
                head_dtype=str(data.get("head_dtype", "")),
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


def verify_file(directory: Path, name: str, entry: FileEntry,
                check_hash: bool = True) -> FileStamp | None:
    """Raise :class:`ShardError` naming the file if it is missing, truncated or altered.

    Returns the stamp of the bytes hashed (:func:`~edgetp.shard.stamps.settled_sha256`), or
    None when not hashed or when no stamp can vouch for them.
    """
    path = directory / name
    if not path.is_file():
        raise ShardError(f"shard file {path} is missing; copy the rank directory again or re-split")
    size = path.stat().st_size
    if size != entry.size:
        raise ShardError(
            f"shard file {path} has {size} bytes, the manifest says {entry.size}: it is "
            "truncated or was replaced; copy it again or re-split"
        )
    if not check_hash:
        return None
    sha256, stamp = settled_sha256(path)
    if sha256 != entry.sha256:
        raise ShardError(
            f"shard file {path} fails its sha256 check: it is corrupted; copy it again or re-split"
        )
    return stamp


VERIFIED_NAME = ".verified.json"


def verify_directory(directory: Path, manifest: Manifest, check_hash: bool = True) -> None:
    """Verify every file of a shard directory; hash only files not verified before with the
    same stamp (size, modification and change time, inode: :mod:`edgetp.shard.stamps`). The
    record lives in ``.verified.json``; a record of an older edgetp (no ctime) is redone."""
    record_path = directory / VERIFIED_NAME
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    fresh = {}
    for name, entry in manifest.files.items():
        path = directory / name
        stamp = _verified(entry, FileStamp.of(path)) if path.is_file() else None
        if stamp is None or record.get(name) != stamp:
            hashed = verify_file(directory, name, entry, check_hash=check_hash)
            stamp = _verified(entry, hashed) if check_hash else stamp
        fresh[name] = stamp
    if check_hash and fresh != record:
        try:
            record_path.write_text(json.dumps(fresh))
        except OSError:
            pass  # a read-only shard directory is verified again next time


def _verified(entry: FileEntry, stamp: FileStamp | None) -> list[Any] | None:
    """A ``.verified.json`` entry: the sha256 verified, with the file's stamp then."""
    return None if stamp is None else [entry.sha256, *stamp.model_dump().values()]


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
