"""The launcher: a cluster file's nodes checked, shards shipped, workers and the master started.

:meth:`Launcher.prepare` checks every node, splits, ships, installs keys and (re)starts the
workers; then either :meth:`Launcher.running_master` runs the master in this process, or
:meth:`Launcher.serve` starts ``edgetp serve`` detached on node 0. Both wait until every worker
joined, and fail early, with the end of its log, when a worker has died meanwhile.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetp.config.cluster import ClusterConfig, NodeConfig
from edgetp.config.links import transport_only
from edgetp.core.settings import environment
from edgetp.ops.launch.layout import keys_dir, log_file, node_shard_dir, pid_file
from edgetp.ops.launch.nodes import (
    Facts,
    check_disks,
    check_nodes,
    install_keys,
    probe_all,
    start_process,
    stop_cluster,
)
from edgetp.ops.launch.shell import LaunchError, NodeShell, multiplexed, pool_size
from edgetp.ops.launch.shipping import (
    Progress,
    ShipResult,
    choose_method,
    local_files,
    prepare_split,
    ship,
)
from edgetp.ops.launch.status import api_health
from edgetp.runtime.commands import MasterKeys, ServeCommand, WorkerCommand, WorkerKeys
from edgetp.shard.layout import rank_dir

Log = Callable[[str], None]


@dataclass
class Launcher:
    """Launches the cluster ``config`` describes; progress lines go to ``log``."""

    config: ClusterConfig
    log: Log = lambda line: None  # noqa: E731
    transfer: str = "auto"  # auto | rsync | stream
    ship_shards: bool = True
    emulate_links: bool = False  # delay sends by each node's link profile (transport hook)
    progress: Progress | None = None
    rsync_output: int | None = None  # a file descriptor for rsync's progress, or captured
    shipped: list[ShipResult] = field(default_factory=list)

    def prepare(self) -> None:
        """Check the nodes, split, ship the shards and (re)start the workers."""
        with multiplexed(self.config):
            self._prepare()

    def _prepare(self) -> None:
        config = self.config
        self.log(f"checking {len(config.nodes)} nodes ...")
        facts = probe_all(config)
        check_nodes(config, facts, self.log)
        split = prepare_split(config, self.log)
        check_disks(config, facts, {n.rank: sum(s for s, _ in local_files(
            rank_dir(split, n.rank)).values()) for n in config.nodes})
        if self.ship_shards:
            for node in config.nodes:
                self._ship(node, rank_dir(split, node.rank), facts[node.rank])
        if config.security.curve:
            install_keys(config)
        stop_cluster(config, self.log, workers_only=False)
        with ThreadPoolExecutor(max_workers=pool_size(len(config.workers))) as pool:
            list(pool.map(lambda node: self._start(
                node, self.worker_argv(node), pid_file(config, node), log_file(config, node)),
                config.workers))

    def _ship(self, node: NodeConfig, source: Path, facts: Facts) -> None:
        shell = NodeShell(self.config, node)
        dest = node_shard_dir(self.config, node)
        if node.is_local and Path(dest).resolve() == source.resolve():
            return
        method = choose_method(shell, facts.get("rsync", False), self.transfer)
        result = ship(shell, source, dest, method, self.progress, self.rsync_output)
        self.shipped.append(result)
        self.log("  " + result.describe())

    def worker_argv(self, node: NodeConfig) -> list[str]:
        """``edgetp worker`` on the node: its shard, the master, its CURVE keys or --insecure."""
        c, curve = self.config, self.config.security.curve
        keys = WorkerKeys(f"{keys_dir(node)}/{node.name}.key_secret",
                          f"{keys_dir(node)}/master.key") if curve else None
        command = WorkerCommand(node_shard_dir(c, node), c.master.url, c.timeout_s,
                                memory_budget=node.memory_budget or None, keys=keys,
                                insecure=not curve, data_port=node.data_port,
                                threads=node.threads)
        return command.argv(NodeShell(c, node).python)

    def serve_argv(self, port: int) -> list[str]:
        """``edgetp serve`` on node 0: the cluster's master behind the API (on its loopback)."""
        c, curve, node0 = self.config, self.config.security.curve, self.config.nodes[0]
        keys = c.local_path(c.security.keys_dir or "")
        command = ServeCommand(
            node_shard_dir(c, node0), c.master.bind, port=port,
            keys=MasterKeys(keys / "master.key_secret", keys / "authorized") if curve else None,
            insecure=not curve, timeout_s=c.timeout_s,
            memory_budget=node0.memory_budget or None, wire_dtype=c.wire_dtype,
            allreduce=c.allreduce, model_name=Path(c.model).name, threads=node0.threads)
        return command.argv(NodeShell(c, node0).python)

    def node_env(self, node: NodeConfig) -> dict[str, str]:
        """The environment of the node's process: its threads, and its link's delay if asked."""
        env = {"OMP_NUM_THREADS": str(node.threads)} if node.threads else {}
        profile = self.config.link_profile(node)
        if self.emulate_links and profile is not None:
            env.update(transport_only(profile, "launch --emulate-links: no tc").env())
        return env

    def _start(self, node: NodeConfig, argv: list[str], pidfile: str, log: str) -> int:
        pid = start_process(self.config, node, argv, pidfile, log, self.node_env(node))
        self.log(f"  started {argv[3]} on {node.name} (pid {pid}, log {log})")
        return pid

    def master_shard_dir(self) -> Path:
        return Path(node_shard_dir(self.config, self.config.nodes[0]))

    @contextlib.contextmanager
    def running_master(self, dtype: str = "float32", max_seq_len: int | None = None,
                       join_timeout_s: float = 300.0) -> Iterator[Any]:
        """The master in this process once every worker has joined; closed on exit."""
        from edgetp.kernels.threads import use_threads
        from edgetp.runtime.master import Master

        c, node0 = self.config, self.config.nodes[0]
        if not node0.is_local:
            raise LaunchError("node 0 is the master and has ssh: run `edgetp launch` on it, or "
                              "use --serve to start `edgetp serve` there")
        security = None
        if c.security.curve:
            from edgetp.net.security import KeyPair, MasterSecurity

            keys = c.local_path(c.security.keys_dir or "")
            security = MasterSecurity(KeyPair.load(keys / "master.key_secret"),
                                      keys / "authorized")
        use_threads(node0.threads)
        with environment(self.node_env(node0)):  # the transport reads the link hook when made
            master = Master.cluster(self.master_shard_dir(), c.master.bind, dtype, max_seq_len,
                                    c.wire_dtype, c.timeout_s, memory_budget=node0.memory_budget,
                                    allreduce=c.allreduce, security=security)
        try:
            self.wait_for_join(master.missing_ranks, lambda: master.wait_for_workers(1.0),
                               join_timeout_s)
            yield master
        finally:
            master.close(shutdown_workers=False)

    def wait_for_join(self, missing: Callable[[], list[int]], wait: Callable[[], None],
                      timeout_s: float) -> None:
        """Until ``missing()`` is empty; a worker that died meanwhile fails it with its log."""
        deadline = time.monotonic() + timeout_s
        next_check = time.monotonic() + 3.0
        self.log(f"waiting for {len(self.config.workers)} workers to join {self.config.master.url}")
        while missing():
            try:
                wait()
            except LaunchError:
                raise
            except Exception:  # noqa: BLE001 - not joined yet (ClusterError, no answer)
                pass
            if not missing():
                break
            if time.monotonic() > next_check:
                self._fail_if_dead(missing())
                next_check = time.monotonic() + 5.0
            if time.monotonic() > deadline:
                logs = log_file(self.config, self.config.nodes[-1])
                raise LaunchError(f"workers {missing()} did not join within {timeout_s:g} s; "
                                  f"see their logs (e.g. {logs} on the node) and check the "
                                  "master's address and firewall")
        self.log("all workers joined")

    def _fail_if_dead(self, ranks: list[int]) -> None:
        facts = probe_all(self.config, with_logs=True)
        for rank in ranks:
            f = facts[rank]
            if "error" not in f and f["pids"].get("worker") is None:
                raise LaunchError(f"worker {rank} ({self.config.nodes[rank].name}) is not "
                                  f"running; the end of its log:\n{f['logs']['log'][-1500:]}")

    def serve(self, port: int = 8000, join_timeout_s: float = 300.0,
              extra: list[str] | None = None) -> str:
        """``edgetp serve`` detached on node 0 (loopback there); returns its URL once joined."""
        c, node0 = self.config, self.config.nodes[0]
        shell = NodeShell(c, node0)
        argv = self.serve_argv(port) + list(extra or [])
        self._start(node0, argv, pid_file(c, node0, "master"), log_file(c, node0, "master"))

        def missing() -> list[int]:
            nodes = api_health(shell, port).get("nodes")
            return list(range(1, len(c.nodes))) if not nodes else list(nodes["missing"])

        def wait() -> None:
            time.sleep(1.0)
            facts = probe_all(c, with_logs=True, nodes=[node0])[0]
            if "error" not in facts and facts["pids"].get("master") is None:
                raise LaunchError(f"`edgetp serve` on {node0.name} exited; the end of its log:"
                                  f"\n{facts['logs']['log'][-1500:]}")

        self.wait_for_join(missing, wait, join_timeout_s)
        return f"http://127.0.0.1:{port}/v1 on {node0.name}"
