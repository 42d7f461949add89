"""What one namespace testbed creates, by name, and removing it again: on exit, on errors, on
SIGINT/SIGTERM/SIGHUP (:func:`signals_raise`, :func:`shielded`), and, for leftovers of a
testbed that was killed, by their names (:func:`cleanup_leftovers`, ``edgetp testbed --cleanup``).

Names carry the testbed's 4-hex-digit tag: the bridge ``etpbr<TAG>``, per node k the namespace
``edgetp-<TAG>-k`` and the veth pair ``etpv<TAG>h<k>`` (on the bridge) / ``etpv<TAG>n<k>`` (moved
into the namespace), and the cgroup ``edgetp-testbed-<TAG>/node-k``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetp.core.errors import ClusterError
from edgetp.ops.testbed.cgroups import CGROUP_ROOTS, remove_cgroup

LINK_NAMES = re.compile(r"^etp(br|v)[0-9a-f]{4}")
NS_NAMES = re.compile(r"^edgetp-[0-9a-f]{4}-\d+$")
CGROUP_NAMES = re.compile(r"^edgetp-testbed-[0-9a-f]{4}$")
Log = Callable[[str], None]


class TestbedError(ClusterError):
    """The testbed cannot run here, or a node failed; the message says which and why."""


def bridge_name(tag: str) -> str:
    return f"etpbr{tag}"


def namespace_name(tag: str, rank: int) -> str:
    return f"edgetp-{tag}-{rank}"


def veth_names(tag: str, rank: int) -> tuple[str, str]:
    """The veth pair of node ``rank``: the end on the bridge, the end in the namespace."""
    return f"etpv{tag}h{rank}", f"etpv{tag}n{rank}"


def cgroup_group_name(tag: str) -> str:
    """The parent cgroup of the testbed's nodes (``node-k`` below it)."""
    return f"edgetp-testbed-{tag}"


def run_command(command: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    if check and result.returncode != 0:
        raise TestbedError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")
    return result


def require_root() -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        raise TestbedError("the namespace testbed needs root on Linux (network namespaces, "
                           "tc and cgroups); run it with sudo, or use docker/compose.yaml")
    if shutil.which("ip") is None:
        raise TestbedError("`ip` (iproute2) is missing: apt-get install iproute2")


@dataclass
class Resources:
    """Everything one testbed created, removed in reverse by :meth:`cleanup` (idempotent)."""

    links: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    cgroups: list[Path] = field(default_factory=list)  # children before parents on removal
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cleanup(self, log: Log) -> None:
        for proc in self.processes:
            stop_process(proc)
        for ns in self.namespaces:
            kill_namespace_processes(ns)
        for cgroup in reversed(self.cgroups):
            remove_cgroup(cgroup, log)
        for ns in reversed(self.namespaces):
            if run_command(["ip", "netns", "del", ns], check=False).returncode == 0:
                log(f"removed namespace {ns}")
        for link in reversed(self.links):
            if run_command(["ip", "link", "del", link], check=False).returncode == 0:
                log(f"removed link {link}")
        self.processes.clear()
        self.namespaces.clear()
        self.cgroups.clear()
        self.links.clear()


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def kill_namespace_processes(ns: str) -> None:
    result = run_command(["ip", "netns", "pids", ns], check=False)
    for pid in result.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def cleanup_leftovers(log: Log) -> int:
    """Remove every testbed namespace, link and cgroup by name (``edgetp testbed --cleanup``)."""
    require_root()
    res = Resources()
    res.namespaces = [line.split()[0] for line in run_command(["ip", "netns", "list"]).stdout
                      .splitlines() if line.split() and NS_NAMES.match(line.split()[0])]
    for line in run_command(["ip", "-o", "link", "show"]).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if LINK_NAMES.match(name):
            res.links.append(name)
    for root in CGROUP_ROOTS:
        if root.is_dir():
            res.cgroups += [p for p in root.iterdir() if CGROUP_NAMES.match(p.name)]
    count = len(res.namespaces) + len(res.links) + len(res.cgroups)
    res.cleanup(log)
    return count


SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


@contextlib.contextmanager
def _handling(handler: Any) -> Iterator[None]:
    """``handler`` for SIGTERM, SIGHUP and SIGINT in the block (main thread only)."""
    saved = {}
    with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
        for sig in SIGNALS:
            saved[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def signals_raise() -> contextlib.AbstractContextManager[None]:
    """SIGTERM and SIGHUP interrupt like Ctrl-C, so the cleanup in ``finally`` runs."""
    return _handling(_interrupt)


def shielded() -> contextlib.AbstractContextManager[None]:
    """The three signals ignored: a second Ctrl-C must not cut the cleanup short."""
    return _handling(signal.SIG_IGN)
