"""Real memory limits for test processes: one memory cgroup per process, v1 or v2.

:func:`memory_cgroup` creates a fresh cgroup with a memory limit (cgroup v1: the ``memory``
controller's hierarchy, ``memory.limit_in_bytes``; cgroup v2: a unified hierarchy with the
``memory`` controller, ``memory.max``, swap disabled) and always removes it on exit, after
killing any process still inside that this module started. :meth:`MemoryCgroup.wrap` turns a
command into one that enters the cgroup *before* it runs (``sh`` writes its own pid into
``cgroup.procs`` and then ``exec``s the command), so the process never allocates outside the
limit. :func:`cgroup_support` says which version is usable here, or why none is (tests skip
with that reason): it needs a mounted memory controller and permission to create cgroups.

Only cgroups created here are touched: they live directly under the hierarchy's root, named
``edgetp-test-<pid>-<n>-<label>``; the cgroups of whoever runs the tests are left alone.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_DEFAULT_ROOT = Path("/sys/fs/cgroup")
_counter = itertools.count()


class CgroupUnavailable(RuntimeError):
    """No writable memory cgroup hierarchy here; the message says why (a skip reason)."""


def _cgroup2_mounts() -> list[Path]:
    mounts = []
    try:
        with open("/proc/mounts") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) >= 3 and fields[2] == "cgroup2":
                    mounts.append(Path(fields[1]))
    except OSError:
        pass
    if V2_DEFAULT_ROOT not in mounts and (V2_DEFAULT_ROOT / "cgroup.controllers").is_file():
        mounts.append(V2_DEFAULT_ROOT)
    return mounts


def cgroup_support() -> tuple[int, Path]:
    """(version, hierarchy root) of a memory cgroup hierarchy we may create cgroups in.

    Raises :class:`CgroupUnavailable` with the reason when there is none.
    """
    reasons = []
    if (V1_ROOT / "memory.limit_in_bytes").is_file():
        if os.access(V1_ROOT, os.W_OK):
            return 1, V1_ROOT
        reasons.append(f"cgroup v1 memory hierarchy {V1_ROOT} is not writable (not root?)")
    for root in _cgroup2_mounts():
        try:
            controllers = (root / "cgroup.controllers").read_text().split()
        except OSError:
            continue
        if "memory" not in controllers:
            reasons.append(f"cgroup v2 at {root} has no memory controller ({controllers})")
            continue
        if os.access(root, os.W_OK):
            return 2, root
        reasons.append(f"cgroup v2 hierarchy {root} is not writable (not root?)")
    if not reasons:
        reasons.append("no cgroup v1 memory controller or cgroup v2 hierarchy is mounted")
    raise CgroupUnavailable("; ".join(reasons))


@dataclass
class MemoryCgroup:
    """One cgroup with a memory limit (bytes)."""

    path: Path
    version: int
    limit: int

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def _write(self, name: str, value: str | int) -> None:
        (self.path / name).write_text(str(value))

    def pids(self) -> list[int]:
        return [int(p) for p in self._read("cgroup.procs").split()]

    def add(self, pid: int) -> None:
        """Move an already running process in (prefer :meth:`wrap`: nothing runs outside)."""
        self._write("cgroup.procs", pid)

    def wrap(self, command: list[str]) -> list[str]:
        """``command``, entering this cgroup first: sh puts itself in, then execs it."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.procs_file), *command]

    def usage(self) -> int:
        return int(self._read("memory.usage_in_bytes" if self.version == 1 else
                              "memory.current"))

    def peak(self) -> int | None:
        """Highest memory charged so far (v1 always; v2 needs ``memory.peak``, Linux 5.19)."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int(self._read(name))
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        """Processes the OOM killer killed in this cgroup (-1 when the kernel does not say)."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in self._read(name).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return -1

    def stat(self) -> dict[str, int]:
        out = {}
        for line in self._read("memory.stat").splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
        return out


def _create(version: int, root: Path, label: str, limit: int) -> MemoryCgroup:
    name = f"edgetp-test-{os.getpid()}-{next(_counter)}-{label}"
    path = root / name
    if version == 2:
        subtree = root / "cgroup.subtree_control"
        if "memory" not in subtree.read_text().split():
            subtree.write_text("+memory")
    path.mkdir()
    group = MemoryCgroup(path, version, limit)
    try:
        if version == 1:
            group._write("memory.limit_in_bytes", limit)
            with contextlib.suppress(OSError):  # no swap accounting: nothing to escape to
                group._write("memory.memsw.limit_in_bytes", limit)
        else:
            group._write("memory.max", limit)
            with contextlib.suppress(OSError):
                group._write("memory.swap.max", 0)
        actual = int(group._read("memory.limit_in_bytes" if version == 1 else "memory.max"))
        if abs(actual - limit) > 1 << 20:  # the kernel rounds to pages
            raise CgroupUnavailable(f"{path}: asked for a limit of {limit}, got {actual}")
    except BaseException:
        _remove(group, [])
        raise
    return group


def _remove(group: MemoryCgroup, started: list[int], timeout_s: float = 10.0) -> None:
    """Kill what is left inside (only processes we started), then rmdir the cgroup."""
    deadline = time.monotonic() + timeout_s
    while group.path.exists():
        try:
            left = group.pids()
        except OSError:
            left = []
        for pid in left:
            if pid in started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        try:
            group.path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def memory_cgroup(label: str, limit: int, started: list[int] | None = None,
                  ) -> Iterator[MemoryCgroup]:
    """A new memory cgroup limited to ``limit`` bytes, removed on exit even after a failure.

    ``started``: pids of processes the caller started (a list it may still append to); any of
    them still inside on exit is killed so that the cgroup can be removed.
    """
    version, root = cgroup_support()
    group = _create(version, root, label, limit)
    try:
        yield group
    finally:
        _remove(group, started if started is not None else [])
