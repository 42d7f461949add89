"""Where launch keeps things on a node: its shard, and under its ``cache_dir`` the logs
(``logs/CLUSTER-NAME.log``) and pid files (``run/CLUSTER-NAME.pid``) of what it started."""

from __future__ import annotations

from edgetp.config.cluster import ClusterConfig, NodeConfig


def node_shard_dir(config: ClusterConfig, node: NodeConfig) -> str:
    """The node's rank directory (for this machine, relative to the cluster file)."""
    return str(config.local_path(node.shard_dir)) if node.is_local else node.shard_dir


def cache_dir(node: NodeConfig) -> str:
    return node.cache_dir.rstrip("/")


def keys_dir(node: NodeConfig) -> str:
    """Where a worker's CURVE keys go on the node (security.curve)."""
    return f"{cache_dir(node)}/keys"


def log_file(config: ClusterConfig, node: NodeConfig, role: str = "") -> str:
    return f"{cache_dir(node)}/logs/{config.name}-{role or node.name}.log"


def pid_file(config: ClusterConfig, node: NodeConfig, role: str = "") -> str:
    return f"{cache_dir(node)}/run/{config.name}-{role or node.name}.pid"


def pid_files(config: ClusterConfig, node: NodeConfig) -> dict[str, str]:
    """Pid files by role: each worker's, and node 0's for a detached (``--serve``) master."""
    if node.rank == 0:
        return {"master": pid_file(config, node, "master")}
    return {"worker": pid_file(config, node)}
