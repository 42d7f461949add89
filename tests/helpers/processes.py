"""Every process a test starts ends with it: process groups, owners, and their end.

Tests start processes with :func:`spawn` (a ``subprocess.Popen`` in a new session, so that the
process and whatever it starts form one process group) or :func:`run` (the same, waited for;
on a timeout the whole group is killed, not only its leader).

conftest opens an :class:`Owner` for the session, for each module and for each test
(:func:`open_owner`, :func:`close_owner`; :func:`owning` for a block); the innermost one owns
what starts while it is open. When it closes, it ends

* the process groups spawned while it was the innermost owner,
* the processes handed to it with :meth:`Owner.adopt` (a cluster started by a module fixture
  adopts the workers it restarts during a test, so that the test's owner leaves them alone),
* any other process started meanwhile by the code under test: a new descendant of this
  process, or a process whose environment carries the owner's mark (:data:`MARK_VARIABLE`,
  set while the owner is open and inherited by children), which finds orphans that left
  the process tree (``nohup``, ``setsid``) too;

unless an outer owner still open holds it. Each gets SIGTERM, then SIGKILL after
:data:`GRACE_S`. An owner's mark starts with the marks of the owners around it, also across
processes (a test running pytest), so that an outer owner finds what an inner one missed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import psutil

GRACE_S = 5.0  # between SIGTERM and SIGKILL
MARK_VARIABLE = "TESTS_PROCESS_OWNER"  # the owner's mark in the environment of what it starts


class Owner:
    """The processes started while one scope (session, module, test) was the innermost."""

    def __init__(self, name: str, outer_mark: str | None = None) -> None:
        self.name = name
        self.outer_mark = outer_mark  # the mark in force when this owner opened
        self.mark = f"{outer_mark or ''}/{name}#{uuid.uuid4().hex[:12]}"
        self.existing = _descendant_pids()  # started before: they belong to outer scopes
        self.groups: list[subprocess.Popen[Any]] = []  # spawned group leaders (pgid == pid)
        self.adopted: set[int] = set()

    def adopt(self, pid: int) -> None:
        """Count ``pid`` as this owner's, whichever scope is open when it starts."""
        self.adopted.add(pid)

    def holds(self, pid: int) -> bool:
        return pid in self.adopted or any(leader.pid == pid for leader in self.groups)

    def end(self, held_outside: Sequence[Owner] = ()) -> list[int]:
        """End every process of this owner; returns the pids that were still running."""
        strays = [p for p in self._strays() if not any(o.holds(p.pid) for o in held_outside)]
        running = [p.pid for p in strays if _running(p)]
        running += [leader.pid for leader in self.groups if leader.poll() is None]
        if not running:
            return []
        self._signal(strays, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for leader in self.groups:
            with contextlib.suppress(subprocess.TimeoutExpired):
                leader.wait(max(0.0, deadline - time.monotonic()))
        left = _wait_ended(strays, deadline)
        self._signal(left, signal.SIGKILL)
        for leader in self.groups:
            with contextlib.suppress(subprocess.TimeoutExpired):
                leader.wait(GRACE_S)
        _wait_ended(left, time.monotonic() + GRACE_S)
        return sorted(set(running))

    def _strays(self) -> list[psutil.Process]:
        """Processes started by the code under test: new descendants, and processes marked
        with this owner's mark (orphans included)."""
        found = {p.pid: p for p in _descendants() if p.pid not in self.existing}
        for process in psutil.process_iter():
            if process.pid not in found and process.pid != os.getpid() and self._marked(process):
                found[process.pid] = process
        return list(found.values())

    def _marked(self, process: psutil.Process) -> bool:
        with contextlib.suppress(psutil.Error, OSError):
            mark = process.environ().get(MARK_VARIABLE, "")
            return mark == self.mark or mark.startswith(self.mark + "/")  # or an inner one's
        return False

    def _signal(self, processes: list[psutil.Process], signum: int) -> None:
        """``signum`` to each live spawned group and to each of ``processes``."""
        leaders = {leader.pid for leader in self.groups}
        groups = {leader.pid for leader in self.groups if leader.poll() is None}
        for process in processes:
            with contextlib.suppress(psutil.Error, OSError):
                if (group := os.getpgid(process.pid)) in leaders:
                    groups.add(group)  # the leader is gone, a member is not
                process.send_signal(signum)
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signum)


_owners: list[Owner] = []


def current_owner() -> Owner | None:
    """The innermost open owner (None outside the tests)."""
    return _owners[-1] if _owners else None


def open_owner(name: str) -> Owner:
    """A new innermost owner; its mark is in the environment until :func:`close_owner`."""
    owner = Owner(name, os.environ.get(MARK_VARIABLE))
    os.environ[MARK_VARIABLE] = owner.mark
    _owners.append(owner)
    return owner


def close_owner(owner: Owner) -> list[int]:
    """End every process of ``owner`` (see the module doc); returns those still running."""
    _owners.remove(owner)
    if owner.outer_mark is None:
        os.environ.pop(MARK_VARIABLE, None)
    else:
        os.environ[MARK_VARIABLE] = owner.outer_mark
    return owner.end(held_outside=_owners)


@contextlib.contextmanager
def owning(name: str) -> Iterator[Owner]:
    """An owner for the block; on exit every process of it is ended."""
    owner = open_owner(name)
    try:
        yield owner
    finally:
        close_owner(owner)


def spawn(args: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(args, ...)`` leading a new process group, owned by the current owner."""
    if popen_kwargs.pop("start_new_session", True) is not True:
        raise ValueError("spawn() always starts a new session")
    proc = subprocess.Popen(list(args), start_new_session=True, **popen_kwargs)
    if (owner := current_owner()) is not None:
        owner.groups.append(proc)
    return proc


def run(args: Sequence[str], *, timeout: float, input: str | bytes | None = None,
        capture_output: bool = False, check: bool = False,
        **popen_kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """:func:`subprocess.run` in a process group of its own: on a timeout (or any error while
    waiting) the whole group is killed, grandchildren included."""
    if input is not None:
        popen_kwargs["stdin"] = subprocess.PIPE
    if capture_output:
        popen_kwargs["stdout"] = popen_kwargs["stderr"] = subprocess.PIPE
    with spawn(args, **popen_kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            kill_group(proc)
            exc.stdout, exc.stderr = proc.communicate()
            raise
        except BaseException:
            kill_group(proc)
            raise
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, stdout, stderr)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL to the process group ``proc`` leads (while its leader is not reaped)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(GRACE_S)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie is not)."""
    with contextlib.suppress(psutil.Error):
        return _running(psutil.Process(pid))
    return False


def _running(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return process.status() != psutil.STATUS_ZOMBIE
    return False


def _descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _descendant_pids() -> set[int]:
    return {p.pid for p in _descendants()}


def _wait_ended(processes: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Wait until ``processes`` have ended or the deadline (``time.monotonic()``) has passed;
    returns those still running. Nothing is reaped: whoever started a child waits for it."""
    left = [p for p in processes if _running(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if _running(p)]
    return left
