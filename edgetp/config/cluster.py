"""The cluster file: one YAML file describes the machines of a cluster and how to reach them.

``edgetp launch``, ``edgetp status`` and the testbeds read it (``configs/*.yaml`` are examples;
the README has the reference)::

    name: home                      # optional; names logs and pid files (default: file stem)
    model: ~/models/Llama-3.2-3B    # a HF checkpoint (split here) or a split (with rank-K/)
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
:class:`~edgetp.config.ConfigError` naming the file, the place and the fix.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgetp.config.links import (
    BUILTIN_PROFILES,
    LinkProfile,
    load_profiles,
    parse_profile,
    parse_profiles,
)
from edgetp.core.errors import ConfigError
from edgetp.core.files import read_yaml
from edgetp.core.units import parse_bytes

TOP_KEYS = ("name", "model", "split_dir", "private_layers", "master", "nodes", "link_profiles",
            "link", "security", "allreduce", "wire_dtype", "shares", "ssh_options", "timeout")
MASTER_KEYS = ("address", "port", "bind")
NODE_KEYS = ("name", "address", "ssh", "shard_dir", "memory_budget", "memory_limit", "threads",
             "share", "link", "python", "cache_dir", "profile", "count")
SECURITY_KEYS = ("curve", "keys_dir")
ALLREDUCE = ("star", "ring")
WIRE_DTYPES = ("f32", "bf16", "int8")
DEFAULT_PORT = 5555
_SSH = re.compile(r"^(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9._:\[\]-]+?(?::(\d+))?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    profile: str | dict[str, Any] | None = None  # for the planner: a probe file or figures

    @property
    def is_local(self) -> bool:
        return self.ssh is None

    @property
    def ssh_host(self) -> str:
        """``user@host`` without the port."""
        assert self.ssh is not None
        match = _SSH.match(self.ssh)
        port = match.group(1) if match else None
        return self.ssh[: -len(port) - 1] if port else self.ssh

    @property
    def ssh_port(self) -> int | None:
        match = _SSH.match(self.ssh or "")
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
    _check_keys(data, TOP_KEYS, source, "the cluster file")
    if "model" not in data and not planning:
        raise ConfigError(f"{source}: 'model' is required (a HF checkpoint directory or a split "
                          "directory with rank-0/ ... rank-N-1/)")
    profiles = _profiles(data.get("link_profiles"), source, base_dir)
    default_link = _link(data.get("link"), "cluster", f"{source}: link", profiles)
    nodes = _nodes(data.get("nodes"), source, profiles, default_link, planning)
    nodes = _apply_shares(nodes, data.get("shares"), data.get("nodes"), source)
    master = _master(data.get("master"), nodes[0], source)
    name = _string(data.get("name", default_name), f"{source}: name")
    if not _NAME.match(name):
        raise ConfigError(f"{source}: name {name!r} may only use letters, digits, '.', '_', '-'")
    return ClusterConfig(
        name=name, model=_string(data.get("model", "-"), f"{source}: model"), master=master,
        nodes=nodes, link_profiles=profiles, security=_security(data.get("security"), source),
        allreduce=_choice(data.get("allreduce", "star"), ALLREDUCE, f"{source}: allreduce"),
        wire_dtype=_choice(data.get("wire_dtype", "f32"), WIRE_DTYPES, f"{source}: wire_dtype"),
        split_dir=_optional_string(data.get("split_dir"), f"{source}: split_dir"),
        private_layers=_int(data.get("private_layers", 0), f"{source}: private_layers", 0),
        ssh_options=_ssh_options(data.get("ssh_options", []), source),
        timeout_s=_positive(data.get("timeout", 10.0), f"{source}: timeout"),
        source=source, base_dir=base_dir)


# -- sections ----------------------------------------------------------------------------------

def _profiles(raw: Any, source: str, base_dir: Path) -> dict[str, LinkProfile]:
    if raw is None:
        return dict(BUILTIN_PROFILES)
    if isinstance(raw, str):  # a file of profiles, relative to the cluster file
        path = Path(raw).expanduser()
        return load_profiles(path if path.is_absolute() else base_dir / path)
    return {**BUILTIN_PROFILES, **parse_profiles(raw, f"{source}: link_profiles")}


def _link(raw: Any, owner: str, where: str, profiles: dict[str, LinkProfile]) -> str | None:
    """A link profile's name; an inline mapping is added to ``profiles`` as ``OWNER-link``."""
    if raw is None:
        return None
    if isinstance(raw, dict):
        name = f"{owner}-link"
        profiles[name] = parse_profile(name, raw, where)
        return name
    link = _string(raw, where)
    if link not in profiles:
        raise ConfigError(f"{where}: unknown link profile {link!r}; known: "
                          f"{', '.join(sorted(profiles))} (define more under link_profiles, or "
                          "give one inline: {latency_ms: 1, bandwidth_mbit: 300})")
    return link


def _nodes(raw: Any, source: str, profiles: dict[str, LinkProfile], default_link: str | None,
           planning: bool) -> tuple[NodeConfig, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: 'nodes' must be a non-empty list; node 0 is the master")
    nodes: list[NodeConfig] = []
    for index, item in enumerate(raw):
        nodes += _node(item, index, len(nodes), source, profiles, default_link, planning)
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


def _node(raw: Any, index: int, rank: int, source: str, profiles: dict[str, LinkProfile],
          default_link: str | None, planning: bool) -> list[NodeConfig]:
    """The node(s) of ``nodes[index]``: one, or ``count`` numbered copies when planning."""
    where = f"{source}: nodes[{index}]"
    _check_keys(raw, NODE_KEYS, where, "a node")
    name = _string(raw.get("name", f"node-{rank}"), f"{where}.name")
    if not _NAME.match(name):
        raise ConfigError(f"{where}: name {name!r} may only use letters, digits, '.', '_', '-'")
    where = f"{where} ({name})"
    count = _int(raw.get("count", 1), f"{where}.count", 1)
    if count > 1 and not planning:
        raise ConfigError(f"{where}: count is for planning files (`edgetp plan`); a cluster "
                          "that runs lists every node with its own address")
    address = _address(raw, where, planning)
    if "shard_dir" not in raw and not planning:
        raise ConfigError(f"{where}: 'shard_dir' is required: where rank-{rank}'s directory "
                          f"lives on that node (e.g. ~/edgetp/rank-{rank})")
    ssh = _optional_string(raw.get("ssh"), f"{where}.ssh")
    if ssh is not None and not _SSH.match(ssh):
        raise ConfigError(f"{where}: ssh {ssh!r} must look like user@host or user@host:port")
    link = _link(raw.get("link"), name, f"{where}.link", profiles) or default_link
    profile = raw.get("profile")
    if profile is not None and not isinstance(profile, str | dict):
        raise ConfigError(f"{where}.profile must be a profile file (from `edgetp probe`) or a "
                          f"mapping of figures, got {profile!r}")
    node = NodeConfig(
        rank=rank, name=name, address=address,
        shard_dir=_string(raw.get("shard_dir", "-"), f"{where}.shard_dir"), ssh=ssh,
        memory_budget=_size(raw.get("memory_budget"), f"{where}: memory_budget"),
        memory_limit=_size(raw.get("memory_limit"), f"{where}: memory_limit"),
        threads=None if raw.get("threads") is None else _int(raw["threads"],
                                                              f"{where}.threads", 1),
        share=_positive(raw.get("share", 1.0), f"{where}.share"), link=link,
        python=_string(raw.get("python", "python3"), f"{where}.python"),
        cache_dir=_string(raw.get("cache_dir", "~/.cache/edgetp"), f"{where}.cache_dir"),
        profile=profile)
    if count == 1:
        return [node]
    return [replace(node, rank=rank + i, name=f"{name}-{i}") for i in range(count)]


def _address(raw: dict[str, Any], where: str, planning: bool) -> str:
    if "address" not in raw:
        if planning:
            return ""
        raise ConfigError(f"{where}: 'address' is required (the node's IP or host name)")
    address = _string(raw["address"], f"{where}.address")
    if "://" in address or re.match(r"^[^:]+:\d+$", address):
        raise ConfigError(f"{where}: address {address!r} is a host name or IP, without "
                          "tcp:// or a port")
    return address


def _apply_shares(nodes: tuple[NodeConfig, ...], raw: Any, raw_nodes: list[Any],
                  source: str) -> tuple[NodeConfig, ...]:
    if raw is None:
        return nodes
    if any("share" in item for item in raw_nodes):
        raise ConfigError(f"{source}: give shares either per node (share: ...) or as the "
                          "top-level list shares: [...], not both")
    if not isinstance(raw, list) or len(raw) != len(nodes):
        count = len(raw) if isinstance(raw, list) else "no list of"
        raise ConfigError(f"{source}: shares has {count} values but there are {len(nodes)} "
                          f"nodes; give one relative share per node, e.g. "
                          f"[{', '.join(['1'] * len(nodes))}]")
    return tuple(replace(node, share=_positive(value, f"{source}: shares[{node.rank}]"))
                 for node, value in zip(nodes, raw, strict=True))


def _master(raw: Any, first: NodeConfig, source: str) -> MasterConfig:
    raw = {} if raw is None else raw
    _check_keys(raw, MASTER_KEYS, f"{source}: master", "master")
    address = _string(raw.get("address", first.address or "127.0.0.1"),
                      f"{source}: master.address")
    port = _int(raw.get("port", DEFAULT_PORT), f"{source}: master.port", 1)
    if port > 65535:
        raise ConfigError(f"{source}: master.port {port} is not a TCP port (1-65535)")
    bind = _string(raw.get("bind", f"tcp://0.0.0.0:{port}"), f"{source}: master.bind")
    if not re.match(r"^tcp://[^:]+:\d+$", bind):
        raise ConfigError(f"{source}: master.bind {bind!r} must look like tcp://0.0.0.0:{port}")
    return MasterConfig(address, port, bind)


def _security(raw: Any, source: str) -> SecurityConfig:
    raw = {} if raw is None else raw
    _check_keys(raw, SECURITY_KEYS, f"{source}: security", "security")
    curve = raw.get("curve", False)
    if not isinstance(curve, bool):
        raise ConfigError(f"{source}: security.curve must be true or false, got {curve!r}")
    keys_dir = _optional_string(raw.get("keys_dir"), f"{source}: security.keys_dir")
    if curve and keys_dir is None:
        raise ConfigError(f"{source}: security.curve is on: give security.keys_dir (a directory "
                          "for the master's and the workers' key pairs; `edgetp keys` makes them)")
    return SecurityConfig(curve, keys_dir)


def _ssh_options(raw: Any, source: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(o, str) for o in raw):
        raise ConfigError(f"{source}: ssh_options must be a list of strings, e.g. "
                          "['-i', '~/.ssh/edgetp']")
    return tuple(raw)


# -- values ------------------------------------------------------------------------------------

def _check_keys(raw: Any, known: tuple[str, ...], where: str, what: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {what} must be a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; {what} has "
                              f"{', '.join(known)}")


def _string(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float) or str(value) == "":
        raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
    return str(value)


def _optional_string(value: Any, where: str) -> str | None:
    return None if value is None else _string(value, where)


def _choice(value: Any, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{where} must be a number > 0, got {value!r}")
    return float(value)


def _size(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigError(f"{where} must be a size such as 1.5GiB, got {value!r}")
    try:
        return parse_bytes(value)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
