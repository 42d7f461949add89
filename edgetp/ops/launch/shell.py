"""Running commands on one node: ``sh`` over ssh (or here, for the node without ``ssh``).

:class:`NodeShell` runs a shell command on a node, or one command of the node helper
(:mod:`edgetp.ops.remote`: its text goes along as ``python -c``, see that module for why) and
reads its JSON answer; a failure names the node and, for the usual causes (no ssh key, no such
interpreter), the fix. :func:`multiplexed` keeps one ssh session per node open for a block, so
that the many commands of a launch do not each connect anew.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgetp.config.cluster import ClusterConfig, NodeConfig
from edgetp.core.errors import ClusterError
from edgetp.ops import remote

SSH_BASE = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=10",
            "-o", "ServerAliveCountMax=3")


class LaunchError(ClusterError):
    """The cluster cannot be launched as configured; the message names the node and the fix."""


def sh_path(path: str) -> str:
    """``path`` for the node's ``sh``: a leading ``~/`` expanded there, the rest quoted."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


@functools.cache
def remote_source() -> str:
    """The text of :mod:`edgetp.ops.remote`, sent to the node with each command."""
    return inspect.getsource(remote)


def pool_size(n: int) -> int:
    """Threads for one task per node: at least one, at most 16."""
    return max(1, min(16, n))


class NodeShell:
    """Runs ``sh`` commands on one node: over ssh, or here when the node has no ``ssh``."""

    def __init__(self, config: ClusterConfig, node: NodeConfig) -> None:
        self.config = config
        self.node = node
        local_default = node.is_local and node.python == "python3"
        self.python = sys.executable if local_default else node.python

    @property
    def where(self) -> str:
        return f"node {self.node.rank} ({self.node.name}, {self.node.ssh or 'this machine'})"

    def ssh_argv(self) -> list[str]:
        """``ssh [options]`` without the host (rsync's ``-e`` wants exactly this).

        Connections share one ssh session per node (``ControlMaster``) while
        :func:`multiplexed` holds it open; without it every command connects anew.
        """
        options = [os.path.expanduser(o) for o in self.config.ssh_options]
        port = ["-p", str(self.node.ssh_port)] if self.node.ssh_port else []
        control = ["-o", f"ControlPath={_control_dir()}/%C", "-o", "ControlMaster=auto"]
        return ["ssh", *SSH_BASE, *control, *options, *port]

    def argv(self, command: str) -> list[str]:
        """The local command that runs the ``sh`` command ``command`` on the node."""
        if self.node.is_local:
            return ["sh", "-c", command]
        return [*self.ssh_argv(), "--", self.node.ssh_host, "sh -c " + shlex.quote(command)]

    def run(self, command: str, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        stdin = subprocess.DEVNULL if input is None else None
        try:
            return subprocess.run(self.argv(command), capture_output=True, text=True, input=input,
                                  timeout=timeout, stdin=stdin, check=False)
        except subprocess.TimeoutExpired:
            raise LaunchError(f"{self.where}: no answer within {timeout:g} s") from None

    def remote_command(self, command: str, args: Any = None, unbuffered: bool = False) -> str:
        """The ``sh`` command that runs the node helper's COMMAND there: ``PYTHON -c TEXT
        COMMAND JSON``, which is ``python -m edgetp.ops.remote COMMAND JSON`` without needing
        edgetp (or this version of it) on the node."""
        words = [sh_path(self.python), *(["-u"] if unbuffered else []), "-c",
                 shlex.quote(remote_source()), command]
        if args is not None:
            words.append(shlex.quote(json.dumps(args)))
        return " ".join(words)

    def remote(self, command: str, args: Any, timeout: float = 600.0) -> Any:
        """Run one command of :mod:`edgetp.ops.remote` on the node; its JSON answer."""
        result = self.run(self.remote_command(command, args), timeout)
        lines = result.stdout.strip().splitlines()
        if result.returncode == 0 and lines:
            return json.loads(lines[-1])
        raise LaunchError(f"{self.where}: {self.failure(result)}")

    def failure(self, result: subprocess.CompletedProcess[str]) -> str:
        """What went wrong, from a failed command's status and the last line of its stderr."""
        err = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        if result.returncode == 255 and not self.node.is_local:
            return (f"cannot ssh to {self.node.ssh} ({err}); check that `ssh {self.node.ssh} "
                    "true` works without a password prompt (a key in ssh-agent or ssh_options)")
        if result.returncode == 127:
            return (f"{self.python} not found ({err}); set `python:` for this node to the "
                    "interpreter that has edgetp installed")
        return err


_MULTIPLEXED: set[str] = set()  # ssh targets with an open shared session


def _control_dir() -> Path:
    path = Path(tempfile.gettempdir()) / f"edgetp-ssh-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _ssh_control(shell: NodeShell, *args: str) -> None:
    """``ssh ARGS HOST`` with no pipes (a persisting session must not hold one open)."""
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        subprocess.run([*shell.ssh_argv(), *args, "--", shell.node.ssh_host], timeout=30,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)


@contextlib.contextmanager
def multiplexed(config: ClusterConfig) -> Iterator[None]:
    """One persistent ssh session per remote node for the block (ControlPersist), then closed.

    The session is opened on its own (``-M -N -f``, no pipes), so that no command waits on a
    pipe the persisting session would hold open.
    """
    shells = {n.ssh: NodeShell(config, n) for n in config.nodes
              if n.ssh is not None and n.ssh not in _MULTIPLEXED}  # (nested: already open)
    _MULTIPLEXED.update(shells)
    with ThreadPoolExecutor(max_workers=pool_size(len(shells))) as pool:
        list(pool.map(lambda sh: _ssh_control(sh, "-M", "-N", "-f", "-o", "ControlPersist=600"),
                      shells.values()))
    try:
        yield
    finally:
        for target, shell in shells.items():
            _ssh_control(shell, "-O", "exit")
            _MULTIPLEXED.discard(target)
