"""A ``.gguf`` wherever a model directory is expected: converted once, kept by content.

:func:`model_dir_for` returns a Hugging Face directory for either kind of path: a directory
as it is, a GGUF file as its conversion under ``$EDGETP_CACHE/gguf/`` (beside the splits'
cache), in ``DIGEST/STEM/``: the file's sha256, so the same bytes are converted once whatever
the file is called or where it lies and a changed file is converted anew, then the name of the
file first converted (which becomes the model's name, e.g. in ``serve``). The
sha256 of each file seen is remembered with its stat stamp (:mod:`edgetp.shard.stamps`) in
``hashes.json``, so a file used again costs one ``stat``, not a read. One process converts a
given file at a time (a lock file per digest); the others wait and reuse its result.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from edgetp.core import settings
from edgetp.model.gguf import GGUF_SOURCE_FILE, convert_gguf, is_gguf_path, read_source_record
from edgetp.model.gguf.convert import ProgressFn
from edgetp.shard.stamps import FileStamp, settled_sha256

HASHES_FILE = "hashes.json"
DIGEST_CHARS = 32


class KnownHash(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: str
    stamp: FileStamp


def gguf_cache_root() -> Path:
    return settings.cache_dir() / "gguf"


def model_dir_for(path: str | Path, progress: ProgressFn | None = None,
                  log: Callable[[str], None] | None = None) -> Path:
    """A Hugging Face model directory for ``path``: itself, or a GGUF file's cached conversion.

    ``progress`` follows a conversion (see ``convert_gguf``); ``log`` gets a line before each
    long step (hashing a new file, converting it).
    """
    path = Path(path)
    if not (is_gguf_path(path) and path.is_file()):
        return path
    root = gguf_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    digest = file_digest(path, root, log)[:DIGEST_CHARS]
    with _locked(root / f"{digest}.lock"):
        target = _converted(root / digest)
        if target is None:
            target = root / digest / path.stem
            if log is not None:
                log(f"converting {path} into {target} (once; later uses reuse it)")
            convert_gguf(path, target, progress, force=True)
        _point_at(target, path)
    return target


def _converted(digest_dir: Path) -> Path | None:
    """The complete conversion kept under ``digest_dir``, if any."""
    if not digest_dir.is_dir():
        return None
    done = sorted(d for d in digest_dir.iterdir() if (d / "config.json").is_file())
    return done[0] if done else None


def file_digest(path: Path, root: Path, log: Callable[[str], None] | None = None) -> str:
    """``path``'s sha256, read from ``hashes.json`` when its stamp is unchanged."""
    known = _read_hashes(root)
    key = str(path.resolve())
    entry = known.get(key)
    if entry is not None and entry.stamp == FileStamp.of(path):
        return entry.sha256
    if log is not None:
        log(f"hashing {path} ({path.stat().st_size / 2**20:.0f} MiB, once per file version)")
    sha256, stamp = settled_sha256(path)
    if stamp is not None:
        known[key] = KnownHash(sha256=sha256, stamp=stamp)
        _write_hashes(root, known)
    return sha256


def _point_at(model_dir: Path, gguf_path: Path) -> None:
    """Record where the GGUF now lies in the conversion's ``gguf_source.json`` (the splitter
    reads the file's own blocks from there)."""
    record = read_source_record(model_dir)
    where = str(gguf_path.resolve())
    if record is None or record["path"] == where:
        return
    record["path"] = where
    tmp = model_dir / f".{GGUF_SOURCE_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, model_dir / GGUF_SOURCE_FILE)


def _read_hashes(root: Path) -> dict[str, KnownHash]:
    try:
        raw = json.loads((root / HASHES_FILE).read_text())
        return {k: KnownHash.model_validate(v) for k, v in raw.items()}
    except (OSError, ValueError, ValidationError, AttributeError):
        return {}


def _write_hashes(root: Path, known: dict[str, KnownHash]) -> None:
    tmp = root / f".{HASHES_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({k: v.model_dump() for k, v in known.items()}, indent=1))
    os.replace(tmp, root / HASHES_FILE)


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created if needed) for the block."""
    with lock_file.open("a") as handle:
        with contextlib.suppress(OSError):  # no flock on this filesystem: go on unlocked
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
