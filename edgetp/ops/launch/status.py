"""``edgetp status``: per node reachable, versions, memory, disk, shard, running processes and
the ssh echo round trip (a line through an open ssh session: the link's RTT plus ssh's own
overhead); and the health of a detached ``edgetp serve``."""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import time
from typing import Any

from edgetp.config.cluster import ClusterConfig
from edgetp.ops.launch.nodes import gib, probe_all
from edgetp.ops.launch.shell import NodeShell, multiplexed


def cluster_status(config: ClusterConfig, rtt: bool = True) -> list[dict[str, Any]]:
    """One row per node: its facts, ``up``, ``running`` {role: pid} and ``rtt_ms``."""
    with multiplexed(config):
        facts = probe_all(config)
        rows = []
        for node in config.nodes:
            f = facts[node.rank]
            row: dict[str, Any] = {"rank": node.rank, "name": node.name,
                                   "where": node.ssh or "this machine", "up": "error" not in f,
                                   **f}
            row["running"] = {role: pid for role, pid in f.get("pids", {}).items() if pid}
            if row["up"] and rtt and not node.is_local:
                row["rtt_ms"] = echo_rtt_ms(NodeShell(config, node))
            rows.append(row)
        return rows


def render_status(config: ClusterConfig, rows: list[dict[str, Any]]) -> str:
    lines = [f"cluster {config.name}: master {config.master.url}", "",
             "| rank | node | via | up | python | edgetp | memory free | disk free | shard | "
             "running | ssh echo RTT |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["up"]:
            lines.append(f"| {r['rank']} | {r['name']} | {r['where']} | no: {r['error']} "
                         "| | | | | | | |")
            continue
        running = ", ".join(f"{k} {v}" for k, v in r["running"].items()) or "-"
        rtt = r.get("rtt_ms")
        lines.append(
            f"| {r['rank']} | {r['name']} | {r['where']} | yes | {r['python']} | "
            f"{r['edgetp'] or 'missing'} | {gib(r.get('mem_available'))} of "
            f"{gib(r.get('mem_total'))} | {gib(r['disk_free'])} | "
            f"{'present' if r['shard_present'] else 'missing'} | {running} | "
            f"{'-' if rtt is None else f'{rtt:.2f} ms'} |")
    return "\n".join(lines)


def _echo_once(proc: subprocess.Popen[bytes], timeout_s: float) -> float | None:
    """Seconds for one line there and back, or None if the session ended or timed out."""
    assert proc.stdin is not None and proc.stdout is not None
    started = time.perf_counter()
    proc.stdin.write(b"x\n")
    proc.stdin.flush()
    got = b""
    while not got.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        chunk = os.read(proc.stdout.fileno(), 64) if ready else b""
        if not chunk:
            return None
        got += chunk
    return time.perf_counter() - started


def echo_rtt_ms(shell: NodeShell, count: int = 5, timeout_s: float = 10.0) -> float | None:
    """Best round trip of a line through an open ssh session to the node (ms), or None."""
    proc = subprocess.Popen(shell.argv(shell.remote_command("echo", unbuffered=True)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    samples = []
    try:
        for _ in range(count + 1):  # the first one includes the session's start
            sample = _echo_once(proc, timeout_s)
            if sample is None:
                return None
            samples.append(sample)
    except (BrokenPipeError, OSError):
        return None
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return min(samples[1:]) * 1000 if len(samples) > 1 else None


def api_health(shell: NodeShell, port: int) -> dict[str, Any]:
    """``/health`` of the API on the node's loopback; empty if there is no answer."""
    result = shell.run(shell.remote_command("health", {"port": port}), timeout=30)
    try:
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {}
