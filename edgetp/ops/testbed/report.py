"""The testbed's report: per node its namespace (or container), address, the link emulation in
force (the entrypoint's line in its log), memory limit and cgroup peak, with the master's
result; ``testbed.json`` and ``testbed.md``. Both testbeds write it, the namespace one and the
Docker one (``kind``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgetp.config.cluster import ClusterConfig
from edgetp.core.files import read_json
from edgetp.core.units import format_bytes
from edgetp.ops.testbed.cgroups import NodeMemory, node_memory_limit
from edgetp.ops.testbed.processes import tail
from edgetp.ops.testbed.resources import Log, TestbedError

EMULATION_LINE = "edgetp.ops.linkemu: "  # what the entrypoint's linkemu prints first
NAMESPACES = "network namespaces"
CONTAINERS = "docker containers"
PLACE_KEY = {NAMESPACES: "namespace", CONTAINERS: "container"}  # where a node runs


def describe_nodes(config: ClusterConfig) -> list[dict[str, Any]]:
    return [{"rank": n.rank, "name": n.name, "address": n.address, "link": n.link,
             "link_profile": None if n.link is None else config.link_profiles[n.link].summary(),
             "memory_budget_bytes": n.memory_budget, "memory_limit_bytes": node_memory_limit(n)}
            for n in config.nodes]


def emulation_line(log_path: Path) -> str:
    for line in tail(log_path, 200_000).splitlines():
        if line.startswith(EMULATION_LINE):
            return line.removeprefix(EMULATION_LINE)
    return "none"


def write_report(config: ClusterConfig, places: list[str], memory: list[NodeMemory], out: Path,
                 log: Log, kind: str = NAMESPACES) -> dict[str, Any]:
    """Join the master's ``result.json`` with the nodes; write testbed.json and testbed.md.

    ``places``: each node's namespace or container (``kind``); ``memory``: its cgroup's limit
    and peak as read during the run.
    """
    result_path = out / "result.json"
    if not result_path.is_file():
        raise TestbedError("the master wrote no result; its log ends:\n"
                           + tail(out / "logs" / f"{config.nodes[0].name}.log"))
    result = read_json(result_path, "the master's result", TestbedError)
    nodes = describe_nodes(config)
    for node, place, used in zip(nodes, places, memory, strict=True):
        node[PLACE_KEY[kind]] = place
        node["cgroup_limit_bytes"], node["cgroup_peak_bytes"] = used
        node["emulation"] = emulation_line(out / "logs" / f"{node['name']}.log")
    report = {"testbed": kind, "cluster": config.name, "nodes": nodes,
              **result}
    (out / "testbed.json").write_text(json.dumps(report, indent=1))
    (out / "testbed.md").write_text(testbed_markdown(report))
    if "error" in result:
        raise TestbedError(f"the master failed: {result['error']} (logs in {out}/logs)")
    log(f"wrote {out}/testbed.json and testbed.md" + (", bench report in bench/"
                                                      if "bench" in result else ""))
    return report


def testbed_markdown(report: dict[str, Any]) -> str:
    place = PLACE_KEY.get(report["testbed"], "namespace")
    lines = [f"# edgetp testbed ({report['testbed']}): {report['cluster']}", "",
             f"| rank | node | {place} | address | link emulation in force | memory limit | "
             "peak memory (cgroup) |", "|---|---|---|---|---|---|---|"]
    for n in report["nodes"]:
        peak = n.get("cgroup_peak_bytes")
        lines.append(f"| {n['rank']} | {n['name']} | {n.get(place, '')} | {n['address']} "
                     f"| {n['emulation']} | {format_bytes(n['memory_limit_bytes'])} | "
                     f"{format_bytes(peak) if peak else '-'} |")
    gen = report.get("generation")
    if gen:
        lines += ["", f"prompt: `{report.get('prompt', '')}`", "",
                  f"output: `{gen['text']}`", "",
                  f"{gen['generated_tokens']} tokens, TTFT {gen['ttft_ms']:.1f} ms, "
                  f"{gen['ms_per_token']:.2f} ms/token"]
    bench = report.get("bench")
    if bench:
        lines += ["", f"bench ({bench['workload']}): {bench['ms_per_token']:.2f} ms/token mean, "
                  f"report in bench/report.md"]
    if "error" in report:
        lines += ["", f"error: {report['error']}"]
    return "\n".join(lines) + "\n"
