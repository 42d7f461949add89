"""Local workers live no longer than their master: both ends of that tie.

A local cluster's workers (:class:`~edgetp.runtime.local.LocalCluster`) are this machine's
processes, started for one master; when the master dies, even by SIGKILL, they must go too.
Workers that ``edgetp launch`` starts on other machines are not tied: they outlive a master
and rejoin the next one.

* The master's side, :func:`spawn_tied`: Linux sends a child its parent-death signal when the
  *thread* that forked it ends, not the process, so every tied worker is forked by one thread
  that lives as long as this process (a cluster may be started from a short-lived thread).
* The worker's side, :func:`follow_parent` (``edgetp worker --parent-pid PID``): it asks
  Linux for SIGTERM when its parent goes (``prctl(PR_SET_PDEATHSIG)``), exits at once if the
  parent is already gone, and watches its parent's pid in a thread, which covers systems
  without ``prctl`` (the worker is reparented when its parent dies).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("edgetp.runtime.lifeline")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_INTERVAL_S = 0.5  # how often a worker looks at its parent's pid
EXIT_GRACE_S = 5.0  # after SIGTERM to itself, a worker that has not ended exits hard


# -- the master's side ---------------------------------------------------------------------------

_Request = tuple[Callable[[], subprocess.Popen[bytes]], "Future[subprocess.Popen[bytes]]"]
_requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
_spawner: threading.Thread | None = None
_spawner_lock = threading.Lock()


def _spawn_loop() -> None:
    while True:
        start, result = _requests.get()
        try:
            result.set_result(start())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result.set_exception(exc)


def spawn_tied(command: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(command, ...)`` forked by the process's one long-lived spawner thread.

    The child's parent-death signal then fires when this process ends, not when the thread
    that asked for the child does.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_spawn_loop, name="edgetp-spawner", daemon=True)
            _spawner.start()
    result: Future[subprocess.Popen[bytes]] = Future()
    _requests.put((lambda: subprocess.Popen(list(command), **popen_kwargs), result))
    return result.result()


# -- the worker's side ---------------------------------------------------------------------------

def follow_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` stops being its parent (SIGTERM, then a hard exit).

    Called first thing in a worker of a local cluster, from the main thread.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a terminated worker just ends
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    _ask_for_death_signal(signal.SIGTERM)
    watch = ParentWatch(parent_pid, _end_this_process)
    if watch.parent_gone():  # the master died before the request above took effect
        _end_this_process(parent_pid)
    watch.start()


def _ask_for_death_signal(signum: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, signum)``; False where there is no such call (not Linux)."""
    prctl = _prctl()
    return prctl is not None and int(prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)) == 0


def death_signal_preexec(signum: int) -> Callable[[], None]:
    """A ``preexec_fn`` for a child that is not edgetp's (it cannot follow its parent itself):
    Linux sends it ``signum`` when this process ends. libc is looked up here, in the parent,
    so the forked child only makes the call."""
    prctl = _prctl()

    def ask() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    return ask


def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, or None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def _end_this_process(parent_pid: int) -> None:
    log.warning("the master (pid %d) is gone; this local worker exits with it", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(EXIT_GRACE_S)
    os._exit(1)  # SIGTERM did not end us (blocked or ignored): go anyway


class ParentWatch:
    """A daemon thread that calls ``on_gone(parent_pid)`` once the process's parent changes."""

    def __init__(self, parent_pid: int, on_gone: Callable[[int], None],
                 interval_s: float = WATCH_INTERVAL_S,
                 getppid: Callable[[], int] = os.getppid) -> None:
        self.parent_pid = parent_pid
        self.on_gone = on_gone
        self.interval_s = interval_s
        self._getppid = getppid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgetp-parent-watch",
                                        daemon=True)

    def parent_gone(self) -> bool:
        return self._getppid() != self.parent_pid

    def start(self) -> ParentWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.parent_gone():
                self.on_gone(self.parent_pid)
                return
