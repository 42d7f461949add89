"""The testbed's network: a bridge with no address (nothing leaves the namespaces), and per node
a network namespace joined to it by a veth pair, ``eth0`` inside with the node's address; and
the command that starts a node process inside its namespace and cgroup."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from edgetp.config.cluster import ClusterConfig
from edgetp.core.errors import ConfigError
from edgetp.ops.testbed.resources import (
    Resources,
    bridge_name,
    namespace_name,
    run_command,
    veth_names,
)

REPO = Path(__file__).resolve().parents[3]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"  # shared with the Docker testbed


def _addresses(config: ClusterConfig) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """Each node's address as an interface of one /24 (else the config is wrong)."""
    addresses = [ipaddress.ip_interface(f"{n.address}/24") for n in config.nodes]
    if len({a.network for a in addresses}) != 1:
        got = [n.address for n in config.nodes]
        raise ConfigError(f"{config.source}: the testbed needs every node address in one /24 "
                          f"(e.g. 10.77.0.1 ... 10.77.0.N), got {got}")
    return addresses


def setup_network(tag: str, config: ClusterConfig, res: Resources) -> list[str]:
    """The bridge, and a namespace with its veth and address per node; the namespaces."""
    addresses = _addresses(config)
    bridge = bridge_name(tag)
    run_command(["ip", "link", "add", bridge, "type", "bridge"])
    res.links.append(bridge)
    run_command(["ip", "link", "set", bridge, "up"])
    namespaces = []
    for node, address in zip(config.nodes, addresses, strict=True):
        ns = namespace_name(tag, node.rank)
        host, peer = veth_names(tag, node.rank)
        run_command(["ip", "netns", "add", ns])
        res.namespaces.append(ns)
        run_command(["ip", "link", "add", host, "type", "veth", "peer", "name", peer])
        res.links.append(host)
        run_command(["ip", "link", "set", host, "master", bridge, "up"])
        run_command(["ip", "link", "set", peer, "netns", ns])
        run_command(["ip", "-n", ns, "link", "set", peer, "name", "eth0"])
        run_command(["ip", "-n", ns, "addr", "add", str(address), "dev", "eth0"])
        run_command(["ip", "-n", ns, "link", "set", "eth0", "up"])
        run_command(["ip", "-n", ns, "link", "set", "lo", "up"])
        namespaces.append(ns)
    return namespaces


def node_command(ns: str, cgroup: Path | None, args: list[str]) -> list[str]:
    """Join the cgroup, then exec the shared entrypoint (link profile, then edgetp) in ``ns``.

    The cgroup is joined *before* ``ip netns exec``, which remounts /sys for the namespace (the
    cgroup files are not visible inside); membership carries over the exec.
    """
    inner = 'echo $$ > "$0/cgroup.procs" && exec "$@"' if cgroup else 'exec "$@"'
    return ["sh", "-c", inner, str(cgroup or "sh"), "ip", "netns", "exec", ns, str(ENTRYPOINT),
            *args]
