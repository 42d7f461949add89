"""The cluster file: one YAML file describes the machines of a cluster and how to reach them.

``edgetp launch``, ``edgetp status`` and the testbeds read it (``configs/*.yaml`` are examples;
docs/cluster.md has the reference)::

    name: home                      # optional; names logs and pid files (default: file stem)
    model: ~/models/Llama-3.2-3B    # a HF checkpoint or .gguf (split here) or a split (rank-K/)
    master: {address: 192.168.1.10, port: 5555}   # bind defaults to tcp://0.0.0.0:PORT
    nodes:                          # node 0 is the master (this machine)
      - {name: laptop, address: 192.168.1.10, shard_dir: ~/edgetp/rank-0, memory_budget: 6GiB}
      - {name: pi, address: 192.168.1.12, ssh: me@192.168.1.12, shard_dir: ~/edgetp/rank-1,
         memory_budget: 1.5GiB, threads: 4, share: 1, link: home-wifi}
    link_profiles: {home-wifi: {latency_ms: 5, jitter_ms: 2, bandwidth_mbit: 100}}
    security: {curve: false}
    allreduce: star
    wire_dtype: f32

``edgetp plan --cluster`` reads the same file (:func:`load_cluster_config` with
``planning=True``): each node then needs a ``profile`` (an ``edgetp probe`` JSON file, relative
to the cluster file, or inline figures) and a link (per node, or ``link:`` at the top for all),
while ``model``, ``address`` and ``shard_dir`` become optional, and ``count: 8`` stands for
eight identical nodes. A launch ignores ``profile``; ``link`` may name a profile or give one
inline (``{latency_ms: 1, bandwidth_mbit: 300}``).

Validation is strict: an unknown key, a duplicate node name or address, shares that do not
match the node count, a size that does not parse or a missing ``shard_dir`` is a
:class:`~edgetp.core.errors.ConfigError` naming the file, the place and the fix. The pydantic
schema of each mapping is :mod:`edgetp.config.cluster_file`; what needs the whole file (ranks,
unique names and addresses, shares, links) is checked here, where the file becomes the frozen
:class:`ClusterConfig` the rest of edgetp reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgetp.config.cluster_file import (
    NAME,
    NAME_RULE,
    SSH,
    ClusterFile,
    LinkProfileSection,
    NodeSection,
    Purpose,
)
from edgetp.config.links import BUILTIN_PROFILES, LinkProfile, ProfilesFile, load_profiles
from edgetp.config.schema import validate
from edgetp.core.errors import ConfigError
from edgetp.core.files import read_yaml


@dataclass(frozen=True)
class MasterConfig:
    address: str  # where the workers reach the master
    port: int
    bind: str  # what the master binds (tcp://0.0.0.0:PORT by default)

    @property
    def url(self) -> str:
        return f"tcp://{self.address}:{self.port}"


@dataclass(frozen=True)
class NodeConfig:
    rank: int
    name: str
    address: str
    shard_dir: str  # on the node: where its rank-K directory lives
    ssh: str | None = None  # user@host[:port]; None: this machine (no ssh)
    memory_budget: int | None = None  # edgetp's budget (weights, KV cache, buffers), bytes
    memory_limit: int | None = None  # the testbeds' hard cgroup/container limit, bytes
    threads: int | None = None
    share: float = 1.0
    link: str | None = None  # a link profile name
    python: str = "python3"  # the node's interpreter that has edgetp installed
    cache_dir: str = "~/.cache/edgetp"  # on the node: logs/ and run/ (pid files)
    data_port: int | None = None  # the worker's data link port (None: an ephemeral one)
    profile: str | dict[str, Any] | None = None  # for the planner: a probe file or figures

    @property
    def is_local(self) -> bool:
        return self.ssh is None

    @property
    def ssh_host(self) -> str:
        """``user@host`` without the port."""
        assert self.ssh is not None
        match = SSH.match(self.ssh)
        port = match.group(1) if match else None
        return self.ssh[: -len(port) - 1] if port else self.ssh

    @property
    def ssh_port(self) -> int | None:
        match = SSH.match(self.ssh or "")
        return int(match.group(1)) if match and match.group(1) else None


@dataclass(frozen=True)
class SecurityConfig:
    curve: bool = False
    keys_dir: str | None = None  # on this machine: NAME.key / NAME.key_secret (`edgetp keys`)


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    model: str
    master: MasterConfig
    nodes: tuple[NodeConfig, ...]
    link_profiles: dict[str, LinkProfile] = field(default_factory=dict)
    security: SecurityConfig = SecurityConfig()
    allreduce: str = "star"
    wire_dtype: str = "f32"
    split_dir: str | None = None
    private_layers: int = 0
    ssh_options: tuple[str, ...] = ()
    timeout_s: float = 10.0
    source: str = "cluster"
    base_dir: Path = Path(".")

    @property
    def shares(self) -> tuple[float, ...]:
        return tuple(node.share for node in self.nodes)

    @property
    def workers(self) -> tuple[NodeConfig, ...]:
        return self.nodes[1:]

    def link_profile(self, node: NodeConfig) -> LinkProfile | None:
        return None if node.link is None else self.link_profiles[node.link]

    def local_path(self, path: str) -> Path:
        """A path on this machine: ``~`` expanded, relative to the cluster file's directory."""
        expanded = Path(path).expanduser()
        return expanded if expanded.is_absolute() else self.base_dir / expanded

    def node(self, name: str) -> NodeConfig:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ConfigError(f"{self.source}: no node named {name!r} "
                          f"(nodes: {', '.join(n.name for n in self.nodes)})")


def load_cluster_config(path: str | Path, planning: bool = False) -> ClusterConfig:
    path = Path(path)
    data = read_yaml(path, "cluster file")
    return parse_cluster_config(data, str(path), path.parent, path.stem, planning)


def parse_cluster_config(data: Any, source: str = "cluster", base_dir: Path = Path("."),
                         default_name: str = "cluster", planning: bool = False) -> ClusterConfig:
    """Validate a cluster mapping (see the module docstring); ``planning``: for the planner."""
    file = validate(ClusterFile, data, source, Purpose(planning), keyed=("link_profiles",))
    profiles = _profiles(file.link_profiles, base_dir)
    default_link = _link(file.link, "cluster", f"{source}: link", profiles)
    nodes = _nodes(file.nodes, source, profiles, default_link, planning)
    nodes = _apply_shares(nodes, file, source)
    name = file.name or default_name
    if not NAME.match(name):
        raise ConfigError(f"{source}: name {name!r} {NAME_RULE}")
    master = MasterConfig(file.master.address or nodes[0].address or "127.0.0.1", file.master.port,
                          file.master.bind or f"tcp://0.0.0.0:{file.master.port}")
    return ClusterConfig(
        name=name, model=file.model or "-", master=master, nodes=nodes, link_profiles=profiles,
        security=SecurityConfig(file.security.curve, file.security.keys_dir),
        allreduce=file.allreduce, wire_dtype=file.wire_dtype, split_dir=file.split_dir,
        private_layers=file.private_layers, ssh_options=tuple(file.ssh_options),
        timeout_s=file.timeout, source=source, base_dir=base_dir)


# -- what needs the whole file -----------------------------------------------------------------

def _profiles(raw: str | dict[str, LinkProfileSection] | None,
              base_dir: Path) -> dict[str, LinkProfile]:
    if raw is None:
        return dict(BUILTIN_PROFILES)
    if isinstance(raw, str):  # a file of profiles, relative to the cluster file
        path = Path(raw).expanduser()
        return load_profiles(path if path.is_absolute() else base_dir / path)
    return {**BUILTIN_PROFILES, **ProfilesFile(raw).profiles()}


def _link(raw: str | LinkProfileSection | None, owner: str, where: str,
          profiles: dict[str, LinkProfile]) -> str | None:
    """A link profile's name; an inline profile is added to ``profiles`` as ``OWNER-link``."""
    if raw is None:
        return None
    if isinstance(raw, LinkProfileSection):
        profiles[f"{owner}-link"] = raw.profile(f"{owner}-link")
        return f"{owner}-link"
    if raw not in profiles:
        raise ConfigError(f"{where}: unknown link profile {raw!r}; known: "
                          f"{', '.join(sorted(profiles))} (define more under link_profiles, or "
                          "give one inline: {latency_ms: 1, bandwidth_mbit: 300})")
    return raw


def _nodes(sections: list[NodeSection], source: str, profiles: dict[str, LinkProfile],
           default_link: str | None, planning: bool) -> tuple[NodeConfig, ...]:
    nodes: list[NodeConfig] = []
    for index, section in enumerate(sections):
        nodes += _node(section, index, len(nodes), source, profiles, default_link, planning)
    for what in ("name", "address"):
        seen: dict[str, int] = {}
        for node in nodes:
            value = getattr(node, what)
            if value == "" and planning:
                continue
            if value in seen:
                raise ConfigError(f"{source}: nodes[{node.rank}] and nodes[{seen[value]}] have "
                                  f"the same {what} {value!r}; every node needs its own")
            seen[value] = node.rank
    return tuple(nodes)


def _node(section: NodeSection, index: int, rank: int, source: str,
          profiles: dict[str, LinkProfile], default_link: str | None,
          planning: bool) -> list[NodeConfig]:
    """The node(s) of ``nodes[index]``: one, or ``count`` numbered copies when planning."""
    name = section.name or f"node-{rank}"
    where = f"{source}: nodes[{index}] ({name})"
    if section.shard_dir is None and not planning:
        raise ConfigError(f"{where}: 'shard_dir' is required: where rank-{rank}'s directory "
                          f"lives on that node (e.g. ~/edgetp/rank-{rank})")
    node = NodeConfig(
        rank=rank, name=name, address=section.address or "", shard_dir=section.shard_dir or "-",
        ssh=section.ssh, memory_budget=section.memory_budget, memory_limit=section.memory_limit,
        threads=section.threads, share=section.share or 1.0,
        link=_link(section.link, name, f"{where}.link", profiles) or default_link,
        python=section.python, cache_dir=section.cache_dir, profile=section.profile,
        data_port=section.data_port)
    if section.count == 1:
        return [node]
    return [replace(node, rank=rank + i, name=f"{name}-{i}") for i in range(section.count)]


def _apply_shares(nodes: tuple[NodeConfig, ...], file: ClusterFile,
                  source: str) -> tuple[NodeConfig, ...]:
    if file.shares is None:
        return nodes
    if any(section.share is not None for section in file.nodes):
        raise ConfigError(f"{source}: give shares either per node (share: ...) or as the "
                          "top-level list shares: [...], not both")
    if len(file.shares) != len(nodes):
        raise ConfigError(f"{source}: shares has {len(file.shares)} values but there are "
                          f"{len(nodes)} nodes; give one relative share per node, e.g. "
                          f"[{', '.join(['1'] * len(nodes))}]")
    return tuple(replace(node, share=share)
                 for node, share in zip(nodes, file.shares, strict=True))
