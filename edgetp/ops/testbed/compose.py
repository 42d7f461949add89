"""The Docker testbed: ``docker/compose.yaml`` rendered from a cluster file
(``edgetp testbed --compose configs/docker-testbed.yaml``): one service per node on one
network, each with the node's address, memory limit, CPUs and link profile, running the same
entrypoint as the namespace testbed; node 0 serves the API (on the host's 127.0.0.1, port
``EDGETP_API_PORT``, default 8000). The file has no top-level ``name``: Compose v1
(``docker-compose`` 1.29) refuses it, and both versions take ``-p NAME``."""

from __future__ import annotations

import ipaddress
from typing import Any

from edgetp.config.cluster import ClusterConfig, NodeConfig
from edgetp.core.settings import ENV_API_PORT, ENV_PROFILE
from edgetp.ops.testbed.cgroups import node_memory_limit
from edgetp.runtime.commands import ServeCommand, WorkerCommand

API_PORT_VARIABLE = ENV_API_PORT  # compose's variable: the host port of the API


def compose_size(n: int) -> str:
    """Bytes as compose writes them: ``2g``, ``512m``, else plain bytes."""
    for unit, scale in (("g", 2**30), ("m", 2**20)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def node_args(config: ClusterConfig, node: NodeConfig, api_port: int) -> list[str]:
    """The service's ``edgetp`` command: node 0 serves (on all its addresses), others work.

    The containers' network is private, not encrypted: ``--insecure``.
    """
    budget = node.memory_budget or None
    if node.rank == 0:
        return ServeCommand(node.shard_dir, f"tcp://0.0.0.0:{config.master.port}",
                            host="0.0.0.0", port=api_port, insecure=True,
                            timeout_s=config.timeout_s, memory_budget=budget,
                            threads=node.threads or 1).args()
    return WorkerCommand(node.shard_dir, config.master.url, config.timeout_s,
                         memory_budget=budget, insecure=True, threads=node.threads or 1).args()


def service(config: ClusterConfig, node: NodeConfig, api_port: int) -> dict[str, Any]:
    env = {"EDGETP_LINK_DEV": "eth0", "OMP_NUM_THREADS": str(node.threads or 1)}
    if node.link:
        env[ENV_PROFILE] = f"${{{ENV_PROFILE}:-{node.link}}}"
    result: dict[str, Any] = {
        "image": "edgetp:local",  # every service builds it (one build, cached), none pulls
        "build": {"context": "..", "dockerfile": "docker/Dockerfile"},
        "hostname": node.name, "cap_add": ["NET_ADMIN"],
        "environment": env, "volumes": ["${EDGETP_SHARDS:-./shards}:/shards:ro"],
        "mem_limit": compose_size(node_memory_limit(node)), "cpus": float(node.threads or 1),
        "networks": {"edgetp": {"ipv4_address": node.address}},
        "command": node_args(config, node, api_port)}
    if node.rank == 0:
        result["ports"] = [f"127.0.0.1:${{{API_PORT_VARIABLE}:-{api_port}}}:{api_port}"]
    else:
        result["depends_on"] = [config.nodes[0].name]
    return result


def docker_compose(config: ClusterConfig, api_port: int = 8000) -> dict[str, Any]:
    """``docker/compose.yaml`` for a cluster file (node 0 serves the API on ``api_port``)."""
    subnet = ipaddress.ip_interface(f"{config.nodes[0].address}/24").network
    return {"services": {node.name: service(config, node, api_port) for node in config.nodes},
            "networks": {"edgetp": {"ipam": {"config": [{"subnet": str(subnet)}]}}}}


def compose_text(config: ClusterConfig, api_port: int = 8000) -> str:
    import yaml

    header = (f"# Generated from {config.source} by\n#   edgetp testbed --compose {config.source}\n"
              "# tests/integration/test_testbed.py checks that the two agree.\n"
              "# Usage: docker/README.md (docker compose -p edgetp -f docker/compose.yaml up)\n")
    return header + yaml.safe_dump(docker_compose(config, api_port), sort_keys=False, width=100)
