"""The cluster file's schema: one pydantic section per mapping, checked key by key.

These models check what each mapping holds on its own (types, ranges, spellings, keys that
go together, what a launch needs that a plan does not). What needs the whole file (ranks,
names and addresses unique across nodes, shares against the node count, link names against
the profiles) is checked where the file becomes a :class:`~edgetp.config.cluster.ClusterConfig`,
in :mod:`edgetp.config.cluster`. The validation context is a :class:`Purpose`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    Tag,
    ValidationInfo,
    model_validator,
)

from edgetp.config.links import LinkProfileSection
from edgetp.config.schema import (
    Count,
    Positive,
    Section,
    Size,
    Text,
    choice,
    matching,
    phrase,
    sentence,
)

ALLREDUCE = ("star", "ring")
WIRE_DTYPES = ("f32", "bf16", "int8")
DEFAULT_PORT = 5555
SSH = re.compile(r"^(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9._:\[\]-]+?(?::(\d+))?$")
SSH_RULE = "must look like user@host or user@host:port"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
NAME_RULE = "may only use letters, digits, '.', '_', '-'"


@dataclass(frozen=True)
class Purpose:
    """What the file is read for: ``planning`` (``edgetp plan``) needs less than a launch."""

    planning: bool = False


def _planning(info: ValidationInfo) -> bool:
    return isinstance(info.context, Purpose) and info.context.planning


def _bare_host(address: str) -> bool:
    return "://" not in address and not re.match(r"^[^:]+:\d+$", address)


def _tcp_port(port: int) -> int:
    if port > 65535:
        raise phrase(f"{port} is not a TCP port (1-65535)")
    return port


def _not_an_ssh_option(value: Any) -> Any:
    """An ``ssh:`` value is ssh's destination: neither its user nor its host may start with
    '-', or ssh would take it for an option (``-F FILE``, ``-oProxyCommand=...``,
    ``x@-oLocalCommand=...`` run commands of the value's choosing)."""
    if isinstance(value, str) and any(part.startswith("-") for part in value.split("@")):
        raise phrase(f"{value!r} has a part that starts with '-', which ssh would read as an "
                     "option, not as the host to reach; give user@host or user@host:port (ssh "
                     "options go in ssh_options)")
    return value


def _profile(value: Any) -> Any:
    if value is not None and not isinstance(value, str | dict):
        raise phrase("must be a profile file (from `edgetp probe`) or a mapping of figures, "
                     f"got {value!r}")
    return value


def _ssh_options(value: Any) -> Any:
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        raise phrase("must be a list of strings, e.g. ['-i', '~/.ssh/edgetp']")
    return value


def _nodes(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise phrase("must be a non-empty list; node 0 is the master")
    return value


def _empty_if_none(value: Any) -> Any:
    """``master:`` with nothing after it means the defaults, as if it were left out."""
    return {} if value is None else value


def _inline_or_name(value: Any) -> str:
    return "<inline>" if isinstance(value, dict) else "<name>"


Name = Annotated[str, matching(NAME.match, NAME_RULE)]
Address = Annotated[str, matching(_bare_host,
                                  "must be a host name or IP, without tcp:// or a port")]
Ssh = Annotated[str, matching(SSH.match, SSH_RULE), BeforeValidator(_not_an_ssh_option)]
# a link: the name of a profile, or one written inline ({latency_ms: 1, bandwidth_mbit: 300})
LinkRef = Annotated[Annotated[Text, Tag("<name>")]
                    | Annotated[LinkProfileSection, Tag("<inline>")],
                    Discriminator(_inline_or_name)]
# link_profiles: a YAML file of profiles (relative to the cluster file), or the profiles
ProfilesRef = Annotated[Annotated[Text, Tag("<name>")]
                        | Annotated[dict[str, LinkProfileSection], Tag("<inline>")],
                        Discriminator(_inline_or_name)]


class NodeSection(Section):
    what: ClassVar[str] = "a node"

    name: Name | None = None
    address: Address | None = None
    ssh: Ssh | None = None
    shard_dir: Text | None = None
    memory_budget: Size = None
    memory_limit: Size = None
    threads: Count | None = None
    share: Positive | None = None
    link: LinkRef | None = None
    python: Text = "python3"
    cache_dir: Text = "~/.cache/edgetp"
    data_port: Annotated[StrictInt, Field(ge=1), AfterValidator(_tcp_port)] | None = None
    profile: Annotated[str | dict[str, Any] | None, BeforeValidator(_profile)] = None
    count: Count = 1

    @model_validator(mode="after")
    def _launchable(self, info: ValidationInfo) -> NodeSection:
        if _planning(info):
            return self
        if self.count > 1:
            raise sentence("count is for planning files (`edgetp plan`); a cluster that runs "
                           "lists every node with its own address")
        if self.address is None:
            raise sentence("'address' is required (the node's IP or host name)")
        return self


class MasterSection(Section):
    what: ClassVar[str] = "master"

    address: Text | None = None  # default: node 0's
    port: Annotated[StrictInt, Field(ge=1), AfterValidator(_tcp_port)] = DEFAULT_PORT
    bind: Text | None = None  # default: tcp://0.0.0.0:PORT

    @model_validator(mode="after")
    def _bind_is_tcp(self) -> MasterSection:
        if self.bind is not None and not re.match(r"^tcp://[^:]+:\d+$", self.bind):
            raise sentence(f"bind {self.bind!r} must look like tcp://0.0.0.0:{self.port}")
        return self


class SecuritySection(Section):
    what: ClassVar[str] = "security"

    curve: StrictBool = False
    keys_dir: Text | None = None

    @model_validator(mode="after")
    def _keys_for_curve(self) -> SecuritySection:
        if self.curve and self.keys_dir is None:
            raise sentence("curve is on: give keys_dir (a directory for the master's and the "
                           "workers' key pairs; `edgetp keys` makes them)")
        return self


class ClusterFile(Section):
    what: ClassVar[str] = "the cluster file"
    hints: ClassVar[dict[str, str]] = {"nodes": " (a list of nodes; node 0 is the master)"}

    name: Name | None = None  # default: the file's stem
    model: Text | None = None
    split_dir: Text | None = None
    private_layers: Annotated[StrictInt, Field(ge=0)] = 0
    master: Annotated[MasterSection, BeforeValidator(_empty_if_none)] = Field(
        default_factory=MasterSection)
    nodes: Annotated[list[NodeSection], BeforeValidator(_nodes)]
    link_profiles: ProfilesRef | None = None
    link: LinkRef | None = None
    security: Annotated[SecuritySection, BeforeValidator(_empty_if_none)] = Field(
        default_factory=SecuritySection)
    allreduce: Annotated[str, choice(ALLREDUCE)] = "star"
    wire_dtype: Annotated[str, choice(WIRE_DTYPES)] = "f32"
    shares: list[Positive] | None = None
    ssh_options: Annotated[list[str], BeforeValidator(_ssh_options)] = Field(default_factory=list)
    timeout: Positive = 10.0

    @classmethod
    def check_keys(cls, data: dict[str, Any], info: ValidationInfo) -> None:
        if "model" not in data and not _planning(info):
            raise sentence("'model' is required (a HF checkpoint directory or a split "
                           "directory with rank-0/ ... rank-N-1/)")
