"""edgetp.config.links."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetp.core.errors import ConfigError
from edgetp.core.files import read_yaml
from edgetp.core.settings import ENV_DELAY, ENV_DESCRIPTION, ENV_JITTER

PROFILE_KEYS = ("latency_ms", "jitter_ms", "bandwidth_mbit", "description")


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


def _number(value: Any, where: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{where} must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


def parse_profile(name: str, raw: Any, where: str) -> LinkProfile:
    """One profile mapping ``{latency_ms, jitter_ms, bandwidth_mbit, description}``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a link profile is a mapping with {', '.join(PROFILE_KEYS)}")
    unknown = sorted(set(raw) - set(PROFILE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a link "
                          f"profile has {', '.join(PROFILE_KEYS)}")
    if "latency_ms" not in raw:
        raise ConfigError(f"{where}: latency_ms is required (one way, per traversal)")
    bandwidth = raw.get("bandwidth_mbit")
    return LinkProfile(
        name, _number(raw["latency_ms"], f"{where}.latency_ms"),
        _number(raw.get("jitter_ms", 0.0), f"{where}.jitter_ms"),
        None if bandwidth is None else _number(bandwidth, f"{where}.bandwidth_mbit", True),
        str(raw.get("description", "")))


def parse_profiles(data: Any, source: str) -> dict[str, LinkProfile]:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: link profiles are a mapping of name -> "
                          "{latency_ms, jitter_ms, bandwidth_mbit}")
    return {str(name): parse_profile(str(name), raw, f"{source}: {name}")
            for name, raw in data.items()}


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
    profiles.update(parse_profiles(data, str(path)))
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
