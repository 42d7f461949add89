"""Link emulation: the latency, jitter and bandwidth of a home link, on one machine.

A :class:`LinkProfile` shapes what a node *sends*, so every link traversal (worker -> master,
master -> worker) is delayed once and rate-limited once. :func:`apply` puts a profile on a node's
interface at start-up (the testbeds' entrypoint, ``docker/entrypoint.sh``, runs it):

* ``tc qdisc ... netem delay D J rate R`` where the kernel has netem (delay, jitter and rate);
* otherwise ``tc qdisc ... tbf rate R`` for the bandwidth, and the **transport hook** for the
  delay: ``EDGETP_LINK_DELAY_MS`` (and ``EDGETP_LINK_JITTER_MS``) make edgetp's transport sleep
  before each data send (``step`` and ``sum`` from the master, ``partial`` from a worker), once
  per traversal (a broadcast to all workers sleeps once: the links are parallel). Control
  messages (handshake, heartbeats, stats) are not delayed, nor is the ring allreduce's
  worker-to-worker traffic: use netem to delay those.

``EDGETP_LINK_EMULATION`` carries a one-line description of what is in force; reports
(``edgetp bench``, the testbeds) record it, so no figure is read without its link.

Shell use (the entrypoint evaluates the output)::

    python -m edgetp.linkemu apply --profile home-wifi [--profiles links.yaml] [--dev eth0]
    python -m edgetp.linkemu show [--profiles links.yaml]
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetp.config import ConfigError, read_yaml

ENV_DELAY = "EDGETP_LINK_DELAY_MS"
ENV_JITTER = "EDGETP_LINK_JITTER_MS"
ENV_DESCRIPTION = "EDGETP_LINK_EMULATION"
ENV_PROFILE = "EDGETP_LINK_PROFILE"
ENV_PROFILES_FILE = "EDGETP_LINK_PROFILES"
DELAYED_OPS = frozenset({"step", "sum", "partial"})  # the data messages of a token
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


# -- the transport hook ------------------------------------------------------------------------


class LinkDelay:
    """The send-side delay of the transport hook; :data:`NO_DELAY` when it is off."""

    def __init__(self, delay_ms: float = 0.0, jitter_ms: float = 0.0, seed: int | None = None):
        self.delay_s = delay_ms / 1000
        self.jitter_s = jitter_ms / 1000
        self._random = random.Random(seed)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LinkDelay:
        """Read ``EDGETP_LINK_DELAY_MS`` / ``EDGETP_LINK_JITTER_MS`` (unset or 0: no delay)."""
        environ = os.environ if environ is None else environ
        values = []
        for key in (ENV_DELAY, ENV_JITTER):
            text = environ.get(key, "").strip() or "0"
            try:
                values.append(float(text))
            except ValueError:
                raise ConfigError(f"{key}={text!r} is not a number of milliseconds") from None
            if values[-1] < 0:
                raise ConfigError(f"{key}={text!r} must be >= 0")
        if values[0] == 0 and values[1] == 0:
            return NO_DELAY
        return cls(values[0], values[1])

    @property
    def active(self) -> bool:
        return self.delay_s > 0 or self.jitter_s > 0

    def before_send(self, op: str) -> None:
        """Sleep one traversal's delay if ``op`` is a data message (see :data:`DELAYED_OPS`)."""
        if op in DELAYED_OPS and self.active:
            jitter = self._random.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0
            time.sleep(max(0.0, self.delay_s + jitter))


NO_DELAY = LinkDelay()


# -- tc ----------------------------------------------------------------------------------------


def tbf_args(rate_mbit: float) -> list[str]:
    """tbf parameters: a burst of ~4 ms at the rate (>= 32 KiB) and a ~200 ms queue."""
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(32 * 1024, int(rate_bytes * 0.004))
    limit = max(256 * 1024, int(rate_bytes * 0.2))
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "limit", str(limit)]


def netem_args(profile: LinkProfile) -> list[str]:
    args = ["netem", "delay", f"{profile.latency_ms:g}ms"]
    if profile.jitter_ms:
        args.append(f"{profile.jitter_ms:g}ms")
    if profile.bandwidth_mbit:
        args += ["rate", f"{profile.bandwidth_mbit:g}mbit"]
    return args


def qdisc_command(dev: str, args: list[str]) -> list[str]:
    return ["tc", "qdisc", "replace", "dev", dev, "root", *args]


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


Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError as exc:
        return subprocess.CompletedProcess(command, 127, "", str(exc))


def _failure(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def apply(profile: LinkProfile, dev: str = "eth0", run: Runner = _run) -> Emulation:
    """Shape ``dev``'s egress with ``profile``: netem if the kernel has it, else tbf + the hook.

    Needs CAP_NET_ADMIN in the node's network namespace; without tc (or the right) only the
    transport delay is emulated, and the description says so.
    """
    wants_delay = profile.latency_ms > 0 or profile.jitter_ms > 0
    netem_note = ""
    if wants_delay:
        result = run(qdisc_command(dev, netem_args(profile)))
        if result.returncode == 0:
            return Emulation(profile, dev, " ".join(netem_args(profile)), False)
        netem_note = f"netem unavailable: {_failure(result)}"
    if not profile.bandwidth_mbit:
        return Emulation(profile, dev, "", wants_delay, netem_note)
    result = run(qdisc_command(dev, tbf_args(profile.bandwidth_mbit)))
    if result.returncode == 0:
        qdisc = f"tbf rate {profile.bandwidth_mbit:g}mbit"
        return Emulation(profile, dev, qdisc, wants_delay, netem_note)
    note = "; ".join(filter(None, [netem_note, f"tbf failed: {_failure(result)}"]))
    return Emulation(profile, dev, "", wants_delay, note)


def transport_only(profile: LinkProfile, why: str = "") -> Emulation:
    """The emulation without tc (no root on the node): only the transport delay."""
    return Emulation(profile, "", "", profile.latency_ms > 0 or profile.jitter_ms > 0, why)


def clear(dev: str, run: Runner = _run) -> None:
    run(["tc", "qdisc", "del", "dev", dev, "root"])


# -- command line (for the entrypoint) ---------------------------------------------------------


def _profile_from(args: argparse.Namespace) -> LinkProfile:
    profiles = load_profiles(args.profiles or os.environ.get(ENV_PROFILES_FILE) or None)
    if args.profile not in profiles:
        raise ConfigError(f"unknown link profile {args.profile!r}; known: "
                          f"{', '.join(sorted(profiles))}")
    return profiles[args.profile]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgetp.linkemu")
    sub = parser.add_subparsers(dest="command", required=True)
    apply_cmd = sub.add_parser("apply", help="shape DEV and print `export` lines to eval")
    apply_cmd.add_argument("--profile", required=True)
    apply_cmd.add_argument("--profiles", default=None, help="YAML file of link profiles")
    apply_cmd.add_argument("--dev", default="eth0")
    show = sub.add_parser("show", help="list the link profiles")
    show.add_argument("--profiles", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "show":
            for profile in load_profiles(args.profiles).values():
                print(profile.summary())
            return 0
        emulation = apply(_profile_from(args), args.dev)
    except ConfigError as exc:
        print(f"edgetp.linkemu: {exc}", file=sys.stderr)
        return 2
    print(f"edgetp.linkemu: {emulation.description()}", file=sys.stderr)
    for key, value in emulation.env().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
