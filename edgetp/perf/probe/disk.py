"""What reading weights from disk costs: a test file read cold, and a split read as the window
reads it (one ``pread`` per tensor, each range's page cache dropped after)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from edgetp.core.errors import ConfigError
from edgetp.shard.layout import rank_dirs
from edgetp.shard.manifest import MANIFEST_NAME

FAST_AS_MEMORY_MBS = 20000  # faster than any disk: the page cache answered


def split_rank_dir(shard_dir: str | Path | None) -> Path | None:
    """The rank directory of a split given as itself or as its parent (a worker's if any)."""
    if shard_dir is None:
        return None
    directory = Path(shard_dir)
    ranks = rank_dirs(directory)
    if ranks:
        directory = ranks[min(1, len(ranks) - 1)]
    return directory if (directory / MANIFEST_NAME).is_file() else None


def disk_dir(shard_dir: str | Path | None) -> Path:
    """Where the disk test writes its file: the shard directory, else the temp directory."""
    if shard_dir is not None and Path(shard_dir).is_dir():
        return Path(shard_dir)
    return Path(tempfile.gettempdir())


def measure_disk(directory: Path, nbytes: int, block: int = 4 << 20) -> tuple[float, str]:
    """MB/s of a sequential read of a file written here, its page cache dropped first; and a
    note when the figure cannot be a disk's."""
    path = directory / f".edgetp-probe-{os.getpid()}.bin"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write a test file in {directory} ({exc.strerror}); give "
                          "--shard-dir a writable directory on the disk the shards use") from exc
    try:
        size = _write_test_file(fd, nbytes, block)
        elapsed = _read_cold(fd, size, block)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    mbs = size / elapsed / 1e6
    note = "" if hasattr(os, "posix_fadvise") else (
        "no posix_fadvise: the read may come from the page cache")
    if mbs > FAST_AS_MEMORY_MBS:
        note = note or "faster than any disk: the page cache was not dropped (tmpfs?)"
    return mbs, note


def _write_test_file(fd: int, nbytes: int, block: int) -> int:
    """Random blocks (nothing to compress) on disk, synced; the file's size."""
    chunk = os.urandom(1 << 20) * (block >> 20)
    for _ in range(max(1, nbytes // block)):
        os.write(fd, chunk)
    os.fsync(fd)
    return os.fstat(fd).st_size


def _read_cold(fd: int, size: int, block: int) -> float:
    """Seconds to read the whole file from disk (its page cache dropped before and after)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    view = memoryview(bytearray(block))
    started, offset = time.perf_counter(), 0
    while offset < size:
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            break
        offset += n
    elapsed = time.perf_counter() - started
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return elapsed


def measure_window_reads(rank_dir: Path, nbytes: int) -> float:
    """MB/s reading a split's tensors the way the window streams them: one ``pread`` per
    tensor, each range's page cache dropped right after, and no readahead (streamed blocks
    lie between pinned ones, so what the kernel would read ahead is mostly not wanted). On
    some disks this is half the rate of one long sequential read."""
    from edgetp.shard.manifest import read_manifest

    manifest = read_manifest(rank_dir)
    names = sorted(n for n in manifest.files if n != "embed.safetensors")
    ranges = [(name, e.offsets) for name in names
              for e in manifest.files[name].tensors.values()]
    buffer = memoryview(bytearray(max(b - a for _, (a, b) in ranges)))
    fds = {name: os.open(rank_dir / name, os.O_RDONLY) for name in names}
    try:
        for fd in fds.values():
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        done, started = 0, time.perf_counter()
        while done < nbytes:
            for name, (start, stop) in ranges:
                done += os.preadv(fds[name], [buffer[: stop - start]], start)
                os.posix_fadvise(fds[name], start, stop - start, os.POSIX_FADV_DONTNEED)
        return done / (time.perf_counter() - started) / 1e6
    finally:
        for fd in fds.values():
            os.close(fd)
