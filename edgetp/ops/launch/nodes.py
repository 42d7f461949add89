"""What launch does on every node, one ssh command each, in parallel: gather the facts and check
them, install CURVE keys, start a process detached, and stop what the pid files name."""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edgetp import __version__
from edgetp.config.cluster import ClusterConfig, NodeConfig
from edgetp.ops.launch.layout import (
    cache_dir,
    keys_dir,
    log_file,
    node_shard_dir,
    pid_files,
)
from edgetp.ops.launch.shell import LaunchError, NodeShell, multiplexed, pool_size, sh_path

MIN_PYTHON = (3, 10)
Log = Callable[[str], None]
Facts = dict[str, Any]  # a node's answer to `facts` (edgetp.ops.remote), or {"error": ...}


def probe_all(config: ClusterConfig, with_logs: bool = False,
              nodes: Iterable[NodeConfig] | None = None) -> dict[int, Facts]:
    """Facts of every node (or of ``nodes``) by rank; a node that cannot be reached has
    ``error``. With ``with_logs``, the end of the log of what launch started there."""
    def probe(node: NodeConfig) -> Facts:
        args: dict[str, Any] = {"shard_dir": node_shard_dir(config, node),
                                "pidfiles": pid_files(config, node)}
        if with_logs:
            args["logs"] = {"log": log_file(config, node, "master" if node.rank == 0 else "")}
        try:
            return dict(NodeShell(config, node).remote("facts", args, timeout=60))
        except LaunchError as exc:
            return {"error": str(exc)}

    chosen = list(config.nodes if nodes is None else nodes)
    with ThreadPoolExecutor(max_workers=pool_size(len(chosen))) as pool:
        return dict(zip((n.rank for n in chosen), pool.map(probe, chosen), strict=True))


def gib(n: Any) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def _node_problems(node: NodeConfig, f: Facts, log: Log) -> list[str]:
    """What keeps a reachable node from running edgetp; warnings go to the log."""
    log(f"  {node.name:<12} python {f['python']}, edgetp {f['edgetp'] or '-'}, "
        f"{gib(f.get('mem_available'))} of {gib(f.get('mem_total'))} memory free, "
        f"{gib(f['disk_free'])} disk free" + (", rsync" if f["rsync"] else ""))
    where, problems = f"node {node.rank} ({node.name})", []
    if tuple(int(x) for x in f["python"].split(".")[:2]) < MIN_PYTHON:
        problems.append(f"{where}: Python {f['python']} is too old; edgetp needs 3.10+")
    if f["edgetp"] is None:
        problems.append(f"{where}: edgetp is not installed for {node.python} "
                        "(pip install edgetp there, or set `python:` for the node)")
    elif f["edgetp"] != __version__:
        log(f"  warning: {where} runs edgetp {f['edgetp']}, this machine {__version__}")
    if node.memory_budget and (f.get("mem_available") or node.memory_budget) < \
            node.memory_budget:
        log(f"  warning: {where} has {gib(f.get('mem_available'))} free memory, less than "
            f"its memory_budget {gib(node.memory_budget)}")
    return problems


def check_nodes(config: ClusterConfig, facts: dict[int, Facts], log: Log) -> None:
    """Log each node's facts; raise listing every blocking problem at once."""
    problems = []
    for node in config.nodes:
        f = facts[node.rank]
        if "error" in f:
            problems.append(f["error"])
        else:
            problems += _node_problems(node, f, log)
    if problems:
        raise LaunchError("cannot launch:\n  " + "\n  ".join(problems))


def check_disks(config: ClusterConfig, facts: dict[int, Facts],
                rank_bytes: dict[int, int]) -> None:
    """A node without its shard needs the disk space for it."""
    problems = []
    for node in config.nodes:
        f, need = facts[node.rank], rank_bytes.get(node.rank, 0)
        if not f["shard_present"] and f["disk_free"] < need:
            problems.append(f"node {node.rank} ({node.name}): {gib(f['disk_free'])} free disk "
                            f"for a {gib(need)} shard; free some space or change shard_dir")
    if problems:
        raise LaunchError("cannot launch:\n  " + "\n  ".join(problems))


def install_keys(config: ClusterConfig) -> None:
    """CURVE: key pairs in keys_dir (made when missing); each worker gets its secret and
    the master's public key over ssh; the master authorizes the workers' public keys."""
    from edgetp.net.security import create_keys  # the CURVE feature (`edgetp keys`)

    keys = config.local_path(config.security.keys_dir or "")
    (keys / "authorized").mkdir(parents=True, exist_ok=True)
    for name in ["master", *(n.name for n in config.workers)]:
        if not (keys / f"{name}.key_secret").is_file():
            create_keys(keys, name)
    for node in config.workers:
        shutil.copyfile(keys / f"{node.name}.key", keys / "authorized" / f"{node.name}.key")
        target = sh_path(keys_dir(node))
        for name in (f"{node.name}.key_secret", "master.key"):
            command = f"umask 077 && mkdir -p {target} && cat > {target}/{shlex.quote(name)}"
            result = NodeShell(config, node).run(command, input=(keys / name).read_text())
            if result.returncode != 0:
                raise LaunchError(f"node {node.rank} ({node.name}): cannot install its "
                                  f"keys: {result.stderr.strip()[-300:]}")


def start_process(config: ClusterConfig, node: NodeConfig, argv: list[str], pidfile: str,
                  log: str, env: dict[str, str]) -> int:
    """``argv`` detached on the node (output to ``log``, pid to ``pidfile``); its pid. A
    process that exits at once fails the launch with the end of its log."""
    args = {"cache": cache_dir(node), "argv": argv, "env": env, "pidfile": pidfile, "log": log,
            "settle": 0.3}
    answer = NodeShell(config, node).remote("start", args, timeout=60)
    if answer["exited"] is not None:
        raise LaunchError(f"node {node.rank} ({node.name}): `{' '.join(argv)}` exited with "
                          f"status {answer['exited']}:\n{answer['tail']}")
    return int(answer["pid"])


def stop_cluster(config: ClusterConfig, log: Log, workers_only: bool = False,
                 grace_s: float = 10.0) -> dict[str, dict[str, str]]:
    """Stop the processes the pid files name (workers, and node 0's detached master)."""
    with multiplexed(config):
        return _stop_nodes(config, config.workers if workers_only else config.nodes, log,
                           grace_s)


def _stop_nodes(config: ClusterConfig, nodes: tuple[NodeConfig, ...], log: Log,
                grace_s: float) -> dict[str, dict[str, str]]:
    def stop(node: NodeConfig) -> dict[str, str]:
        args = {"pidfiles": pid_files(config, node), "grace": grace_s}
        try:
            return dict(NodeShell(config, node).remote("stop", args, timeout=60))
        except LaunchError as exc:
            return {"error": str(exc)}

    with ThreadPoolExecutor(max_workers=pool_size(len(nodes))) as pool:
        answers = dict(zip((n.name for n in nodes), pool.map(stop, nodes), strict=True))
    for name, answer in answers.items():
        for role, what in answer.items():
            if what != "not running":
                log(f"  {name}: {role} {what}")
    return answers
