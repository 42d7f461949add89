"""Knowing that a file has not changed without reading it: stat stamps, and hashes taken safely.

A :class:`FileStamp` is what ``stat`` says about a file's content: its size, modification
time, change time (ctime) and inode. Every write changes the ctime, and unlike the
modification time nothing can set it back (``os.utime`` itself sets it to now), so a file
whose stamp is unchanged still holds the bytes it held when the stamp was taken, with one
race: a write within the same tick of the filesystem's clock as the stamp leaves the ctime
equal. :func:`settled_sha256` closes it: it hashes a file only once its ctime is older than
a tick (waiting out the difference: at most :data:`RACY_FINE_NS` on filesystems with
sub-second timestamps, :data:`RACY_COARSE_NS` on those that keep whole seconds), and it
compares the stamp taken before hashing with one taken after, so a stamp handed out with a
hash always describes the hashed bytes.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from edgetp.core.errors import ShardError

HASH_CHUNK = 4 << 20
RACY_FINE_NS = 50_000_000  # > one kernel clock tick (<= 10 ms) plus the coarse clock's lag
RACY_COARSE_NS = 2_000_000_000  # filesystems whose times are whole (or even) seconds
SETTLE_TRIES = 3


class FileStamp(BaseModel):
    """A file's identity by ``stat``: equal stamps mean unchanged bytes (see the module)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        """The stamp of ``path`` now (``OSError`` if it cannot be stat'ed)."""
        return cls.from_stat(os.stat(path))

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileStamp:
        return cls(size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
                   inode=st.st_ino)


def sha256_file(path: Path) -> str:
    """Hash a file, leaving no page cache behind (so memory figures stay honest)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return digest.hexdigest()


def settled_sha256(path: Path) -> tuple[str, FileStamp | None]:
    """``path``'s sha256 and the stamp its bytes had (see the module docstring).

    The stamp is None when it cannot vouch for the bytes (a ctime that stays in the future,
    as a clock skewed from a network filesystem's gives): the file is then hashed again each
    time. Raises :class:`ShardError` if the file keeps changing while it is hashed.
    """
    for _ in range(SETTLE_TRIES):
        before = _settled_stamp(path)
        digest = sha256_file(path)
        if before is None or FileStamp.of(path) == before:
            return digest, before
    raise ShardError(f"{path} kept changing while edgetp hashed it; wait until whatever "
                     "writes it has finished, then run again")


def _settled_stamp(path: Path) -> FileStamp | None:
    """The stamp of ``path`` once its ctime is older than the filesystem's clock tick."""
    for _ in range(SETTLE_TRIES):
        st = os.stat(path)
        window = RACY_COARSE_NS if st.st_ctime_ns % 1_000_000_000 == 0 else RACY_FINE_NS
        wait_ns = window - (time.time_ns() - st.st_ctime_ns)
        if wait_ns <= 0:
            return FileStamp.from_stat(st)
        time.sleep(min(wait_ns, window) / 1e9)
    return None
