"""A node's link profile applied to its network interface: ``python -m edgetp.ops.linkemu``.

The testbeds' entrypoint (docker/entrypoint.sh) runs ``apply`` before edgetp starts: egress
shaped with ``tc netem`` (delay, jitter, rate) where the kernel has it, else ``tbf`` for the
rate and edgetp's transport delay for the latency (the ``export`` lines it prints, which the
entrypoint evaluates; see :class:`edgetp.config.links.Emulation`). ``show`` lists the profiles.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Callable

from edgetp.config.links import Emulation, LinkProfile, load_profiles
from edgetp.core import settings
from edgetp.core.errors import ConfigError

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


def clear(dev: str, run: Runner = _run) -> None:
    run(["tc", "qdisc", "del", "dev", dev, "root"])


# -- command line (for the entrypoint) ---------------------------------------------------------


def _profile_from(args: argparse.Namespace) -> LinkProfile:
    profiles = load_profiles(args.profiles or settings.link_profiles_file())
    if args.profile not in profiles:
        raise ConfigError(f"unknown link profile {args.profile!r}; known: "
                          f"{', '.join(sorted(profiles))}")
    return profiles[args.profile]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgetp.ops.linkemu")
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
        print(f"edgetp.ops.linkemu: {exc}", file=sys.stderr)
        return 2
    print(f"edgetp.ops.linkemu: {emulation.description()}", file=sys.stderr)
    for key, value in emulation.env().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
