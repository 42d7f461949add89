"""The cluster as the planner sees it: every node's device profile, budget, share and link.

:func:`load_cluster` / :func:`cluster_spec` read the cluster file
(:mod:`edgetp.config.cluster`, with ``planning=True``) and each node's profile
(:mod:`edgetp.config.device`: a file from ``edgetp probe``, relative to the cluster file, or
figures inline); a node without a profile, or without a link in a cluster of several, is an
error that says what to add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgetp.config.cluster import ClusterConfig, load_cluster_config
from edgetp.config.device import DeviceProfile, load_profile
from edgetp.config.links import LinkProfile
from edgetp.core.errors import ConfigError
from edgetp.parallel.window import DEFAULT_RING_SLOTS


@dataclass(frozen=True)
class NodeSpec:
    name: str
    profile: DeviceProfile
    memory_budget: int | None  # bytes for weights, KV cache and buffers; None: no limit
    share: float = 1.0
    link: LinkProfile | None = None  # what this node's sends cross; None: an ideal link

    @property
    def latency_s(self) -> float:
        return 0.0 if self.link is None else self.link.latency_ms * 1e-3

    @property
    def bits_per_s(self) -> float:
        rate = None if self.link is None else self.link.bandwidth_mbit
        return math.inf if rate is None else rate * 1e6


@dataclass(frozen=True)
class ClusterSpec:
    nodes: tuple[NodeSpec, ...]
    wire_dtype: str = "f32"
    private_layers: int = 0
    ring_slots: int = DEFAULT_RING_SLOTS
    allreduce: str = "star"  # or "ring" (edgetp.net.ring)
    data_link: bool = True  # partials and sums over edgetp.net.datalink (sealed with CURVE)

    @property
    def shares(self) -> tuple[float, ...]:
        return tuple(n.share for n in self.nodes)

    @property
    def latency_ms(self) -> float:
        """The slowest link's one-way latency."""
        return max(n.latency_s for n in self.nodes) * 1e3

    @property
    def bandwidth_mbit(self) -> float:
        """The narrowest link's bandwidth (inf: unlimited)."""
        return min(n.bits_per_s for n in self.nodes) / 1e6

    def link_summary(self) -> str:
        links = {n.link for n in self.nodes[1:] or self.nodes}
        if len(links) == 1 and (link := links.pop()) is not None:
            return f"link {link.name} ({_link_figures(link)})"
        if links == {None}:
            return "ideal links"
        return "links " + ", ".join(f"{n.name}: {_link_figures(n.link)}" for n in self.nodes)

    def with_shares(self, shares: tuple[float, ...]) -> ClusterSpec:
        nodes = tuple(replace(n, share=float(s)) for n, s in zip(self.nodes, shares, strict=True))
        return replace(self, nodes=nodes)


def _link_figures(link: LinkProfile | None) -> str:
    if link is None:
        return "ideal"
    rate = "unlimited" if link.bandwidth_mbit is None else f"{link.bandwidth_mbit:g} Mbit/s"
    return f"{link.latency_ms:g} ms one way, {rate}"


def load_cluster(path: str | Path) -> ClusterSpec:
    """The cluster file (:mod:`edgetp.config.cluster`'s format) as the planner needs it."""
    return cluster_spec(load_cluster_config(path, planning=True))


def cluster_spec(config: ClusterConfig) -> ClusterSpec:
    """Every node's profile, budget, share and link; a missing profile or link is an error."""
    profiles: dict[str, DeviceProfile] = {}
    nodes = []
    for node in config.nodes:
        where = f"{config.source}: node {node.name}"
        profile = _node_profile(node.profile, config, where, profiles)
        link = config.link_profile(node)
        if link is None and len(config.nodes) > 1:
            raise ConfigError(f"{where} has no link: give it link: PROFILE (e.g. "
                              "home-wifi, gigabit, tpi-llm, or one under link_profiles), or "
                              "link: {latency_ms: 1, bandwidth_mbit: 300} at the top for all")
        budget = node.memory_budget
        if budget is None and profile.free_memory is not None:
            budget = max(0, profile.free_memory - profile.runtime_rss)
        nodes.append(NodeSpec(node.name, profile, budget, node.share, link))
    return ClusterSpec(tuple(nodes), config.wire_dtype, config.private_layers,
                       allreduce=config.allreduce)


def _node_profile(raw: str | dict[str, Any] | None, config: ClusterConfig, where: str,
                  loaded: dict[str, DeviceProfile]) -> DeviceProfile:
    """A node's profile: figures inline, or a file read once however many nodes name it."""
    if raw is None:
        raise ConfigError(f"{where} has no profile: run `edgetp probe --out NAME.json` on that "
                          "device and add profile: NAME.json, or give figures inline "
                          "(profile: {mem_bw_gbs: 8, disk_bw_mbs: 300})")
    if isinstance(raw, dict):
        return DeviceProfile.from_dict(raw, f"{where}: profile")
    if raw not in loaded:
        loaded[raw] = load_profile(config.local_path(raw), where)
    return loaded[raw]
