"""Link profiles: how a network link between two nodes behaves, and its emulation.

A profile is one way, per traversal: ``latency_ms`` +- ``jitter_ms`` at ``bandwidth_mbit``.
Three are built in (:data:`BUILTIN_PROFILES`, the same as ``configs/links.yaml``); a YAML file
(:func:`load_profiles`) or a cluster file's ``link_profiles:`` add more, validated by
:class:`LinkProfileSection`. :class:`Emulation` is what ``edgetp.ops.linkemu`` put in force on a
node, and the environment the node's transport reads it from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import ConfigDict, RootModel

from edgetp.config.schema import NonNegative, Positive, Section, validate
from edgetp.core.files import read_yaml
from edgetp.core.settings import ENV_DELAY, ENV_DESCRIPTION, ENV_JITTER


@dataclass(frozen=True)
class LinkProfile:
    """One way, per traversal: ``latency_ms`` +- ``jitter_ms``, at ``bandwidth_mbit``."""

    name: str
    latency_ms: float
    jitter_ms: float = 0.0
    bandwidth_mbit: float | None = None  # None: not limited
    description: str = ""

    def summary(self) -> str:
        rate = f"{self.bandwidth_mbit:g} Mbit/s" if self.bandwidth_mbit else "unlimited"
        jitter = f" +-{self.jitter_ms:g} ms" if self.jitter_ms else ""
        return f"{self.name}: {self.latency_ms:g} ms{jitter} per traversal, {rate}"


BUILTIN_PROFILES: dict[str, LinkProfile] = {
    "tpi-llm": LinkProfile("tpi-llm", 1.0, 0.0, 300.0,
                           "the TPI-LLM paper's testbed (arXiv 2410.00531): 300 Mbit/s and 1 ms "
                           "per link, 8 GB devices"),
    "home-wifi": LinkProfile("home-wifi", 5.0, 2.0, 100.0,
                             "a good home Wi-Fi: 100 Mbit/s, 5 ms, 2 ms jitter"),
    "gigabit": LinkProfile("gigabit", 0.2, 0.0, 1000.0, "wired gigabit Ethernet: 0.2 ms"),
}


class LinkProfileSection(Section):
    """A link profile as a file writes it (``latency_ms`` required, the rest optional)."""

    what: ClassVar[str] = "a link profile"
    hints: ClassVar[dict[str, str]] = {"latency_ms": " (one way, per traversal)"}

    latency_ms: NonNegative
    jitter_ms: NonNegative = 0.0
    bandwidth_mbit: Positive | None = None  # None: not limited
    description: str = ""

    def profile(self, name: str) -> LinkProfile:
        return LinkProfile(name, self.latency_ms, self.jitter_ms, self.bandwidth_mbit,
                           self.description)


class ProfilesFile(RootModel[dict[str, LinkProfileSection]]):
    """A mapping of profile names to profiles (a file of them, or ``link_profiles:``)."""

    model_config = ConfigDict(strict=True)

    def profiles(self) -> dict[str, LinkProfile]:
        return {name: section.profile(name) for name, section in self.root.items()}


def load_profiles(path: str | Path | None = None) -> dict[str, LinkProfile]:
    """The built-in profiles, overridden and extended by ``path`` (a YAML file) if given.

    The file is either a mapping of profiles or has them under ``link_profiles:``.
    """
    profiles = dict(BUILTIN_PROFILES)
    if path is None:
        return profiles
    data = read_yaml(path, "link profile file")
    if isinstance(data, dict) and set(data) == {"link_profiles"}:
        data = data["link_profiles"]
    profiles.update(validate(ProfilesFile, data, str(path)).profiles())
    return profiles


@dataclass(frozen=True)
class Emulation:
    """What :func:`apply` put in force on a node."""

    profile: LinkProfile
    dev: str
    qdisc: str  # "netem ...", "tbf ..." or "" (no tc)
    transport_delay: bool  # the transport hook adds the delay
    note: str = ""  # why a fallback was taken

    def description(self) -> str:
        p = self.profile
        parts = []
        if self.qdisc:
            parts.append(f"tc {self.qdisc} on {self.dev}")
        elif p.bandwidth_mbit:
            parts.append("bandwidth not limited")
        if self.transport_delay:
            jitter = f" +-{p.jitter_ms:g}ms" if p.jitter_ms else ""
            parts.append(f"transport delay {p.latency_ms:g}ms{jitter} per traversal")
        text = f"{p.name}: " + " + ".join(parts or ["nothing"])
        return text + (f" ({self.note})" if self.note else "")

    def env(self) -> dict[str, str]:
        """The variables the node's edgetp process needs (the hook and the description)."""
        env = {ENV_DESCRIPTION: self.description(), ENV_DELAY: "0", ENV_JITTER: "0"}
        if self.transport_delay:
            env[ENV_DELAY] = f"{self.profile.latency_ms:g}"
            env[ENV_JITTER] = f"{self.profile.jitter_ms:g}"
        return env


def transport_only(profile: LinkProfile, why: str = "") -> Emulation:
    """The emulation without tc (no root on the node): only the transport delay."""
    return Emulation(profile, "", "", profile.latency_ms > 0 or profile.jitter_ms > 0, why)
