"""One run of the Docker testbed: ``edgetp testbed --docker --config configs/docker-testbed.yaml
[MODEL_DIR]``.

The cluster file's nodes run as the services of ``docker/compose.yaml`` (the same image,
addresses, memory limits, CPU shares, ``NET_ADMIN`` and link profiles, rendered by
:func:`.compose.docker_compose`), with two changes: node 0 runs the testbed's master role
(:mod:`.master`: generate, bench, shut the workers down) instead of the API, and every
container mounts the run's folder at ``/out`` (the master's spec and results, the link
profiles). MODEL_DIR, if given, is split for the nodes into ``OUT/split``; without it the
cluster file's ``model`` is the split. While the containers run, the link shaping in force in
each (``tc`` and the entrypoint's variables) and their cgroups' limits and peaks are read
(:class:`.containers.MemoryWatch`); their logs go to ``OUT/logs``, and the report
(:mod:`.report`) is the namespace testbed's, with containers for namespaces. Whatever happens,
the compose project is taken down: no container, network or volume of it is left.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

from edgetp.config.cluster import ClusterConfig
from edgetp.core.errors import ConfigError
from edgetp.ops.testbed.compose import docker_compose
from edgetp.ops.testbed.containers import (
    ComposeProject,
    MemoryWatch,
    container_logs,
    container_name,
    is_running,
    link_in_force,
    require_engine,
    require_image,
)
from edgetp.ops.testbed.processes import tail
from edgetp.ops.testbed.report import CONTAINERS, write_report
from edgetp.ops.testbed.resources import Log, TestbedError, shielded, signals_raise
from edgetp.ops.testbed.run import TestbedRun, master_spec, write_profiles
from edgetp.shard.layout import rank_dir

IMAGE = "edgetp:local"  # what docker/compose.yaml runs
OUT_MOUNT = "/out"
SHARDS_MOUNT = "/shards"
WORKER_EXIT_S = 20.0  # how long the workers get to end once the master has shut them down


def run_docker_testbed(run: TestbedRun, model_dir: Path | None, log: Log) -> dict[str, Any]:
    """Run the cluster in containers, write the reports, and take the compose project down."""
    require_engine()
    require_image(IMAGE)
    config, out = run.config, run.out_dir.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    split = _split(config, model_dir, out, log)
    write_profiles(config, out / "links.yaml")
    hosts = [f"{node.name} ({node.address})" for node in config.nodes]
    master_spec(run, config.nodes[0].shard_dir, hosts, OUT_MOUNT, out / "master-spec.json",
                CONTAINERS)
    project = ComposeProject(f"edgetp-testbed-{secrets.token_hex(2)}", out / "compose.yaml",
                             {"EDGETP_SHARDS": str(split)})
    import yaml

    project.file.write_text(yaml.safe_dump(testbed_compose(config, out), sort_keys=False))
    with signals_raise():
        try:
            project.up()
            log(f"compose project {project.name}: {len(config.nodes)} containers up")
            return _watch_run(run, project, out, log)
        finally:
            with shielded():  # a second Ctrl-C must not cut the cleanup short
                project.down()
            log(f"compose project {project.name}: removed its containers, network and volumes")


def testbed_compose(config: ClusterConfig, out: Path) -> dict[str, Any]:
    """``docker/compose.yaml``'s services with node 0 as the testbed's master and ``out`` at
    /out; each node's own link profile (not a variable of the caller's environment)."""
    data = docker_compose(config)
    for node in config.nodes:
        service = data["services"][node.name]
        del service["build"]  # the image is built beforehand (docker/build-offline.sh)
        mode = "rw" if node.rank == 0 else "ro"
        service["volumes"] = ["${EDGETP_SHARDS}:" + f"{SHARDS_MOUNT}:ro",
                              f"{out}:{OUT_MOUNT}:{mode}"]
        env = service["environment"]
        env["EDGETP_LINK_PROFILES"] = f"{OUT_MOUNT}/links.yaml"
        if node.link:
            env["EDGETP_LINK_PROFILE"] = node.link
    master = data["services"][config.nodes[0].name]
    master["command"] = ["testbed", "--master-role", f"{OUT_MOUNT}/master-spec.json"]
    del master["ports"]
    return data


def _split(config: ClusterConfig, model_dir: Path | None, out: Path, log: Log) -> Path:
    """The split mounted at /shards: MODEL_DIR split into OUT/split, else the file's model."""
    for node in config.nodes:
        if node.shard_dir != f"{SHARDS_MOUNT}/rank-{node.rank}":
            raise ConfigError(f"{config.source}: nodes[{node.rank}].shard_dir must be "
                              f"{SHARDS_MOUNT}/rank-{node.rank} (the split is mounted at "
                              f"{SHARDS_MOUNT})")
    if model_dir is None:
        split = config.local_path(config.model)
        missing = [str(rank_dir(split, n.rank)) for n in config.nodes
                   if not rank_dir(split, n.rank).is_dir()]
        if missing:
            raise ConfigError(f"{config.source}: model {split} is not a split for "
                              f"{len(config.nodes)} nodes (missing {', '.join(missing)}); give "
                              "MODEL_DIR to split it, or run edgetp split")
        return split
    from edgetp.shard.split import split_checkpoint

    split = out / "split"
    shares = None if len(set(config.shares)) == 1 else config.shares
    log(f"splitting {model_dir} for {len(config.nodes)} nodes into {split}")
    split_checkpoint(model_dir, split, len(config.nodes), shares,
                     private_layers=config.private_layers)
    return split


def _watch_run(run: TestbedRun, project: ComposeProject, out: Path,
               log: Log) -> dict[str, Any]:
    """Wait for the master to finish (and the workers to end), reading memory; the report."""
    config = run.config
    containers = [project.container(node.name) for node in config.nodes]
    names = [container_name(c) for c in containers]
    with MemoryWatch(containers) as watch:
        in_force = [link_in_force(c) for c in containers]
        if not _wait_until_stopped(containers[:1], run.run_timeout_s):
            _save_logs(config, containers, out)
            master_log = out / "logs" / f"{config.nodes[0].name}.log"
            raise TestbedError(f"the master did not finish within {run.run_timeout_s:g} s; "
                               "its log ends:\n" + tail(master_log))
        _wait_until_stopped(containers[1:], WORKER_EXIT_S)
    _save_logs(config, containers, out)
    report = write_report(config, names, watch.memory, out, log, CONTAINERS)
    for node, link in zip(report["nodes"], in_force, strict=True):
        node["link_in_force"] = link  # read from the running container
    report["compose_project"] = project.name
    (out / "testbed.json").write_text(json.dumps(report, indent=1))
    return report


def _wait_until_stopped(containers: list[str], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(is_running(c) for c in containers):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _save_logs(config: ClusterConfig, containers: list[str], out: Path) -> None:
    for node, container in zip(config.nodes, containers, strict=True):
        (out / "logs" / f"{node.name}.log").write_text(container_logs(container))
