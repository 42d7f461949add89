"""The testbed's node processes: each started in its namespace and cgroup through the shared
entrypoint (which applies the node's link profile, then runs ``edgetp ARGS``), its output in
``OUT/logs/NODE.log``; and watching them until the master is done."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from edgetp.config.cluster import ClusterConfig, NodeConfig
from edgetp.core.settings import ENV_DELAY, ENV_DESCRIPTION, ENV_JITTER, ENV_PROFILE
from edgetp.ops.testbed.network import REPO, node_command
from edgetp.ops.testbed.resources import Resources, TestbedError
from edgetp.runtime.commands import WorkerCommand


def node_log(out: Path, node: NodeConfig) -> Path:
    return out / "logs" / f"{node.name}.log"


def tail(path: Path, n: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


def node_env(node: NodeConfig, profiles_file: Path) -> dict[str, str]:
    """This environment without link settings, plus what the entrypoint needs for the node."""
    env = {k: v for k, v in os.environ.items()
           if k not in (ENV_DELAY, ENV_JITTER, ENV_DESCRIPTION, ENV_PROFILE)}
    env.update({"EDGETP_PYTHON": sys.executable, "EDGETP_LINK_PROFILES": str(profiles_file),
                "EDGETP_LINK_DEV": "eth0", "OMP_NUM_THREADS": str(node.threads or 1),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                            os.environ.get("PYTHONPATH")]))})
    if node.link:
        env[ENV_PROFILE] = node.link
    return env


def start_node(node: NodeConfig, ns: str, cgroup: Path | None, profiles_file: Path, out: Path,
               args: list[str], res: Resources) -> subprocess.Popen[bytes]:
    """``edgetp ARGS`` as node ``node`` (recorded in ``res`` for the cleanup)."""
    with node_log(out, node).open("wb") as log_file:
        proc = subprocess.Popen(node_command(ns, cgroup, args), env=node_env(node, profiles_file),
                                stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, cwd=str(REPO))
    res.processes.append(proc)
    return proc


def worker_args(config: ClusterConfig, node: NodeConfig,
                max_seq_len: int | None = None) -> list[str]:
    """``edgetp worker`` of a testbed node: its links are private, not encrypted."""
    return WorkerCommand(config.local_path(node.shard_dir), config.master.url, config.timeout_s,
                         max_seq_len=max_seq_len, memory_budget=node.memory_budget or None,
                         insecure=True, threads=node.threads or 1).args()


def start_workers(config: ClusterConfig, namespaces: list[str], groups: list[Path | None],
                  profiles_file: Path, out: Path, res: Resources,
                  max_seq_len: int | None = None) -> None:
    for node in config.workers:
        start_node(node, namespaces[node.rank], groups[node.rank], profiles_file, out,
                   worker_args(config, node, max_seq_len), res)


def wait_for_master(master: subprocess.Popen[bytes],
                    workers: list[tuple[NodeConfig, subprocess.Popen[bytes]]],
                    timeout_s: float, out: Path) -> None:
    """Until the master exits; a worker that fails first, or the time running out, raises."""
    deadline = time.monotonic() + timeout_s
    while master.poll() is None:
        for node, proc in workers:  # status 0: the master told it to shut down (at the end)
            if proc.poll() is not None and proc.returncode != 0:
                log_path = node_log(out, node)
                raise TestbedError(f"worker {node.rank} ({node.name}) exited with status "
                                   f"{proc.returncode}; its log ({log_path}) ends:\n"
                                   + tail(log_path))
        if time.monotonic() > deadline:
            raise TestbedError(f"the master did not finish within {timeout_s:g} s")
        time.sleep(0.2)
