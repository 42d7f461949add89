"""One run of the namespace testbed: build it, run the cluster in it, report, remove it all.

:func:`run_testbed` splits the model (or takes a ready split, as ``edgetp synth-split``
writes), writes the link profiles for the entrypoint, creates the network (:mod:`.network`) and
a cgroup per node (:mod:`.cgroups`), starts the workers and then node 0's master role
(:mod:`.processes`, :mod:`.master`), waits for the master, and writes the report
(:mod:`.report`). Whatever happens, what it created is removed (:mod:`.resources`).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetp.config.cluster import ClusterConfig, parse_cluster_config
from edgetp.core.errors import ConfigError
from edgetp.ops.testbed.cgroups import cgroup_kind, cgroup_memory, make_cgroup, node_memory_limit
from edgetp.ops.testbed.network import ENTRYPOINT, setup_network
from edgetp.ops.testbed.processes import start_node, start_workers, wait_for_master
from edgetp.ops.testbed.report import NAMESPACES, describe_nodes, write_report
from edgetp.ops.testbed.resources import (
    Log,
    Resources,
    TestbedError,
    bridge_name,
    cgroup_group_name,
    require_root,
    shielded,
    signals_raise,
)
from edgetp.shard.layout import rank_dir
from edgetp.shard.manifest import MANIFEST_NAME


@dataclass
class TestbedRun:
    config: ClusterConfig
    out_dir: Path
    prompt: str = "count by 3 : 5"
    max_new_tokens: int = 64
    bench: bool = True
    bench_tokens: int = 16  # prompt tokens and generated tokens of the benchmark
    bench_repeat: int = 2
    join_timeout_s: float = 180.0
    run_timeout_s: float = 900.0
    bench_new_tokens: int | None = None  # generated tokens of the benchmark (None: bench_tokens)
    bench_warmup: int = 1
    max_seq_len: int | None = None  # every node's context (None: each node's default)


def flags_config(model_dir: Path, nodes: int, profile: str | None, memory_budget: str | None,
                 memory_limit: str | None, profiles_file: Path | None, out_dir: Path,
                 port: int = 5555) -> ClusterConfig:
    """The cluster of ``edgetp testbed --nodes N ...`` (without ``--config``)."""
    if not 2 <= nodes <= 200:
        raise ConfigError(f"--nodes {nodes}: the testbed runs 2 to 200 nodes")
    split = model_dir if is_split(model_dir) else out_dir / "split"
    node_list = []
    for k in range(nodes):
        node: dict[str, Any] = {"name": f"node-{k}", "address": f"10.77.0.{k + 1}",
                                "shard_dir": str(rank_dir(split, k)), "threads": 1}
        for key, value in (("memory_budget", memory_budget), ("memory_limit", memory_limit),
                           ("link", profile)):
            if value is not None:
                node[key] = value
        node_list.append(node)
    data: dict[str, Any] = {"name": "testbed", "model": str(model_dir.resolve()),
                            "split_dir": str(split), "master": {"port": port},
                            "nodes": node_list}
    if profiles_file is not None:
        data["link_profiles"] = str(profiles_file.resolve())
    return parse_cluster_config(data, "edgetp testbed", Path.cwd(), "testbed")


def run_testbed(run: TestbedRun, log: Log) -> dict[str, Any]:
    """Build the testbed, run the cluster in it, write the reports, and remove everything."""
    require_root()
    if not ENTRYPOINT.is_file():
        raise TestbedError(f"{ENTRYPOINT} not found: the testbed runs from a source checkout")
    config, out = run.config, run.out_dir.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    split = _split(config, log)
    profiles_file = out / "links.yaml"
    write_profiles(config, profiles_file)
    tag = secrets.token_hex(2)
    res = Resources()
    with signals_raise():
        try:
            return _run_in(run, tag, split, profiles_file, res, log)
        finally:
            with shielded():  # a second Ctrl-C must not cut the cleanup short
                res.cleanup(lambda line: None)
            log(f"testbed {tag}: removed its namespaces, links, cgroups and processes")


def _run_in(run: TestbedRun, tag: str, split: Path, profiles_file: Path, res: Resources,
            log: Log) -> dict[str, Any]:
    """The testbed's part that creates things (each recorded in ``res``)."""
    config, out = run.config, run.out_dir.resolve()
    cgroups = cgroup_kind()
    if cgroups is None:
        log("warning: no cgroup memory controller: nodes run without a memory limit")
    namespaces = setup_network(tag, config, res)
    log(f"testbed {tag}: {len(namespaces)} namespaces on bridge {bridge_name(tag)}")
    groups = [make_cgroup(*cgroups, cgroup_group_name(tag), f"node-{n.rank}", node_memory_limit(n),
                          res.cgroups) if cgroups else None for n in config.nodes]
    start_workers(config, namespaces, groups, profiles_file, out, res, run.max_seq_len)
    hosts = [f"{ns} ({n.address})" for n, ns in zip(config.nodes, namespaces, strict=True)]
    spec = master_spec(run, str(rank_dir(split, 0)), hosts, str(out), out / "master-spec.json")
    master = start_node(config.nodes[0], namespaces[0], groups[0], profiles_file, out,
                        ["testbed", "--master-role", str(spec)], res)
    wait_for_master(master, list(zip(config.workers, res.processes[:-1], strict=True)),
                    run.run_timeout_s, out)
    for proc in res.processes[:-1]:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    memory = [cgroup_memory(cgroups[0], g) if cgroups and g else (None, None) for g in groups]
    return write_report(config, namespaces, memory, out, log)


def is_split(path: Path) -> bool:
    """Whether ``path`` is a ready split (rank-0/manifest.json), not a checkpoint to split."""
    return (rank_dir(path, 0) / MANIFEST_NAME).is_file()


def _split(config: ClusterConfig, log: Log) -> Path:
    """The split the nodes run: ``model`` itself when it is one (``edgetp synth-split``
    writes such), else ``model`` split into ``split_dir``."""
    from edgetp.shard.split import split_checkpoint

    model = config.local_path(config.model)
    ready = is_split(model)
    split = model if ready else config.local_path(config.split_dir or "testbed-split")
    for node in config.nodes:
        if config.local_path(node.shard_dir).resolve() != rank_dir(split, node.rank).resolve():
            raise ConfigError(f"{config.source}: nodes[{node.rank}].shard_dir must be "
                              f"{rank_dir(split, node.rank)} (the split_dir's rank-{node.rank})")
    if ready:
        _check_ready_split(split, config)
        return split
    shares = None if len(set(config.shares)) == 1 else config.shares
    log(f"splitting {config.model} for {len(config.nodes)} nodes into {split}")
    split_checkpoint(config.local_path(config.model), split, len(config.nodes), shares,
                     private_layers=config.private_layers)
    return split


def _check_ready_split(split: Path, config: ClusterConfig) -> None:
    from edgetp.shard.manifest import read_manifest

    plan = read_manifest(rank_dir(split, 0)).plan
    if plan.n_ranks != len(config.nodes):
        raise ConfigError(f"the split at {split} is for {plan.n_ranks} nodes, the testbed has "
                          f"{len(config.nodes)}: run it with --nodes {plan.n_ranks}")


def write_profiles(config: ClusterConfig, path: Path) -> None:
    """The cluster's link profiles as a file the entrypoint reads (EDGETP_LINK_PROFILES)."""
    import yaml

    data = {name: {"latency_ms": p.latency_ms, "jitter_ms": p.jitter_ms,
                   "bandwidth_mbit": p.bandwidth_mbit, "description": p.description}
            for name, p in config.link_profiles.items()}
    for values in data.values():
        if values["bandwidth_mbit"] is None:
            del values["bandwidth_mbit"]
    path.write_text(yaml.safe_dump({"link_profiles": data}, sort_keys=False))


def master_spec(run: TestbedRun, rank0: str, hosts: list[str], out_dir: str, path: Path,
                kind: str = NAMESPACES) -> Path:
    """What node 0's master role does (:func:`edgetp.ops.testbed.master.master_role`), written
    to ``path``: ``rank0`` and ``out_dir`` as node 0 sees them, ``hosts`` the nodes' places."""
    c = run.config
    spec = {
        "kind": kind,
        "rank0": rank0, "bind": f"tcp://{c.nodes[0].address}:{c.master.port}",
        "wire_dtype": c.wire_dtype, "allreduce": c.allreduce, "timeout_s": c.timeout_s,
        "memory_budget": c.nodes[0].memory_budget, "threads": c.nodes[0].threads or 1,
        "prompt": run.prompt,
        "max_new_tokens": run.max_new_tokens, "join_timeout_s": run.join_timeout_s,
        "bench": run.bench, "bench_tokens": run.bench_tokens, "bench_repeat": run.bench_repeat,
        "bench_new_tokens": run.bench_new_tokens or run.bench_tokens,
        "bench_warmup": run.bench_warmup, "max_seq_len": run.max_seq_len,
        "model_name": Path(c.model).name, "out_dir": out_dir,
        "hosts": {str(n.rank): host for n, host in zip(c.nodes, hosts, strict=True)},
        "testbed": describe_nodes(c),
    }
    path.write_text(json.dumps(spec, indent=1))
    return path
