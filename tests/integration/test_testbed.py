"""The emulated testbeds: the Docker files agree with their cluster file, and the namespace
testbed runs a cluster end to end (root only), cleaning up after itself even when interrupted."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from helpers.paths import REPO

from edgetp.cli import main as cli
from edgetp.config.cluster import load_cluster_config
from edgetp.config.links import load_profiles
from edgetp.core.units import parse_bytes
from edgetp.ops.testbed import docker_compose, flags_config
from edgetp.ops.testbed.cgroups import node_memory_limit
from edgetp.ops.testbed.network import node_command

DOCKER = REPO / "docker"
IS_ROOT = sys.platform == "linux" and os.geteuid() == 0 and shutil.which("ip") is not None
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root on Linux with iproute2 "
                                "(network namespaces, tc, cgroups)")


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_is_rendered_from_the_docker_testbed_config() -> None:
    config = load_cluster_config(REPO / "configs" / "docker-testbed.yaml")
    assert compose() == docker_compose(config), (
        "docker/compose.yaml is out of date: edgetp testbed --compose "
        "configs/docker-testbed.yaml > docker/compose.yaml")


def test_compose_services_ports_shards_limits_and_profiles_agree() -> None:
    config = load_cluster_config(REPO / "configs" / "docker-testbed.yaml")
    services = compose()["services"]
    assert list(services) == [n.name for n in config.nodes] == ["master", "worker-1",
                                                                 "worker-2", "worker-3"]
    profiles = load_profiles(REPO / "configs" / "links.yaml")
    for node in config.nodes:
        service = services[node.name]
        command = service["command"]
        assert command[0] == ("serve" if node.rank == 0 else "worker")
        assert command[command.index("--shards" if node.rank == 0 else "--shard") + 1] \
            == node.shard_dir == f"/shards/rank-{node.rank}"
        assert any(v.endswith(":/shards:ro") for v in service["volumes"])
        assert parse_bytes(command[command.index("--memory-budget") + 1]) == node.memory_budget
        limit = service["mem_limit"]
        assert parse_bytes(limit[:-1] + "GiB" if limit.endswith("g") else limit[:-1] + "MiB") \
            == node_memory_limit(node) == node.memory_limit
        assert service["cpus"] == node.threads
        assert service["cap_add"] == ["NET_ADMIN"]
        default = re.fullmatch(r"\$\{EDGETP_LINK_PROFILE:-([\w.-]+)\}",
                               service["environment"]["EDGETP_LINK_PROFILE"])
        assert default and default.group(1) == node.link and node.link in profiles
        assert service["networks"]["edgetp"]["ipv4_address"] == node.address
        if node.rank == 0:
            assert f"tcp://0.0.0.0:{config.master.port}" in command
            assert service["ports"] == ["127.0.0.1:${EDGETP_API_PORT:-8000}:8000"]
        else:
            assert command[command.index("--master") + 1] == config.master.url
            assert service["depends_on"] == ["master"]
        # every command is a valid `edgetp` command line of this tree
        cli.make_context("edgetp", list(command), resilient_parsing=False)


def test_dockerfile_and_entrypoint_agree_with_compose() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    entrypoint = (DOCKER / "entrypoint.sh").read_text()
    assert not re.search(r"^RUN .*git clone", dockerfile, re.M)
    assert "COPY edgetp ./edgetp" in dockerfile
    # at home FROM python:3.x-slim; offline the base image made by docker/build-offline.sh
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim", dockerfile, re.M)
    assert dockerfile.count("FROM ${BASE_IMAGE}") == 2
    assert "!docker/wheelhouse/" in (DOCKER / "Dockerfile.dockerignore").read_text()
    assert "ARG TORCH_VERSION=2.13.0" in dockerfile
    assert "download.pytorch.org/whl/cpu" in dockerfile
    assert "torch==2.13.0" in (REPO / "Makefile").read_text()  # the same pin
    assert "COPY docker/entrypoint.sh /usr/local/bin/edgetp-entrypoint" in dockerfile
    assert 'ENTRYPOINT ["/usr/local/bin/edgetp-entrypoint"]' in dockerfile
    assert "COPY configs/links.yaml /app/configs/links.yaml" in dockerfile
    assert "EDGETP_LINK_PROFILES=/app/configs/links.yaml" in dockerfile
    for service in compose()["services"].values():
        for variable in service["environment"]:
            if variable.startswith("EDGETP_LINK"):
                assert variable in entrypoint
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text()
    assert "!docker/entrypoint.sh" in ignore and "!configs/links.yaml" in ignore


def test_static_checks_of_the_docker_files(tmp_path: Path) -> None:
    """sh -n and shellcheck (if installed) on the shell scripts; docker-compose config (if
    installed: Compose v1, which refuses a top-level `name`, so the file has none)."""
    scripts = [DOCKER / "entrypoint.sh", DOCKER / "build-offline.sh", DOCKER / "engine.sh"]
    for script in scripts:
        shell = "sh" if script.name == "entrypoint.sh" else "bash"
        subprocess.run([shell, "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", *map(str, scripts),
                        *map(str, (REPO / "launch").glob("*.sh"))], check=True)
    assert "name" not in compose()
    if shutil.which("docker-compose"):
        result = subprocess.run(["docker-compose", "-f", str(DOCKER / "compose.yaml"), "config",
                                 "-q"], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr


def test_flags_config_and_node_command(tmp_path: Path) -> None:
    config = flags_config(REPO / "edgetp" / "model" / "demo_model", 3, "tpi-llm", "64MiB", None,
                          None, tmp_path)
    assert [n.address for n in config.nodes] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    assert config.master.url == "tcp://10.77.0.1:5555"
    assert [n.shard_dir for n in config.nodes] == [str(tmp_path / "split" / f"rank-{k}")
                                                   for k in range(3)]
    assert node_memory_limit(config.nodes[1]) == 64 * 2**20 + int(1.5 * 2**30)
    command = node_command("edgetp-abcd-1", Path("/cg/node-1"), ["worker", "--shard", "x"])
    assert command[:4] == ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', "/cg/node-1"]
    assert command[4:8] == ["ip", "netns", "exec", "edgetp-abcd-1"]
    assert command[8].endswith("docker/entrypoint.sh") and command[9:] == ["worker", "--shard",
                                                                            "x"]


# -- the namespace testbed (root) ---------------------------------------------------------------


def leftovers(tag: str = "") -> list[str]:
    names = [line.split()[0] for line in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.splitlines()
        if line.startswith(f"edgetp-{tag}")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=True).stdout
    names += re.findall(rf"\d+: (etp(?:br|v){tag}\w*)", links)
    for root in (Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")):
        if root.is_dir():
            names += [str(p) for p in root.glob(f"edgetp-testbed-{tag}*")]
    return names


def start_testbed_cli(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "edgetp.cli", "testbed", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, **kwargs)  # type: ignore[call-overload]


@needs_root
def test_cleanup_removes_leftovers_by_name() -> None:
    tag = uuid.uuid4().hex[:4]
    subprocess.run(["ip", "netns", "add", f"edgetp-{tag}-0"], check=True)
    subprocess.run(["ip", "link", "add", f"etpbr{tag}", "type", "bridge"], check=True)
    assert len(leftovers(tag)) == 2
    proc = start_testbed_cli("--cleanup")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert leftovers(tag) == []


@pytest.mark.slow
@needs_root
def test_three_node_testbed_matches_the_single_process_output(tmp_path: Path) -> None:
    from edgetp.config.generation import GenerationConfig, SamplingConfig
    from edgetp.model.demo import DEMO_MODEL_DIR, expected_text
    from edgetp.runtime.master import Master, Prompt

    prompt, tokens = "count by 3 : 5", 40
    proc = start_testbed_cli("--nodes", "3", "--profile", "home-wifi", "--memory-budget", "64MiB",
                       "--max-new-tokens", str(tokens), "--out", str(tmp_path / "out"), "--json",
                       "--prompt", prompt, str(DEMO_MODEL_DIR))
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    report = json.loads(out)
    tag = report["nodes"][0]["namespace"].split("-")[1]
    assert leftovers(tag) == [], "the testbed left namespaces, links or cgroups behind"

    single = Master.local(DEMO_MODEL_DIR).generate(
        Prompt(prompt), SamplingConfig(), GenerationConfig(max_new_tokens=tokens))
    assert report["generation"]["text"] == single.text == expected_text(3, 5)
    assert report["generation"]["token_ids"] == single.token_ids
    for node in report["nodes"]:  # every node ran the entrypoint, which applied the profile
        assert node["emulation"].startswith("home-wifi: ")
        assert ("tc netem" in node["emulation"]) != ("transport delay 5ms" in node["emulation"])
        assert node["memory_limit_bytes"] == 64 * 2**20 + int(1.5 * 2**30)
        if node["cgroup_peak_bytes"] is not None:  # the process ran inside its cgroup
            assert 50 * 2**20 < node["cgroup_peak_bytes"] <= node["memory_limit_bytes"]
    bench = json.loads((tmp_path / "out" / "bench" / "report.json").read_text())
    assert bench["settings"]["link_emulation"].startswith("home-wifi: ")
    assert len(bench["nodes"]) == 3
    assert "home-wifi" in (tmp_path / "out" / "testbed.md").read_text()


@pytest.mark.slow
@needs_root
def test_interrupted_testbed_removes_everything(tmp_path: Path) -> None:
    from edgetp.model.demo import DEMO_MODEL_DIR

    proc = start_testbed_cli("--nodes", "3", "--out", str(tmp_path / "out"), str(DEMO_MODEL_DIR))
    assert proc.stderr is not None
    tag = ""
    deadline = time.monotonic() + 120
    while not tag and time.monotonic() < deadline:
        line = proc.stderr.readline()
        match = re.match(r"testbed ([0-9a-f]{4}): 3 namespaces", line)
        tag = match.group(1) if match else ""
    assert tag, "the testbed did not start"
    while not list((tmp_path / "out" / "logs").glob("node-*.log")):
        time.sleep(0.05)  # the node processes are starting
    assert leftovers(tag)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert leftovers(tag) == [], "an interrupted testbed left things behind"
    assert processes_mentioning(str(tmp_path)) == [], "node processes survived"


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_docker_testbed_compose_is_the_home_file_with_the_master_role(tmp_path: Path) -> None:
    """`edgetp testbed --docker` runs compose.yaml's services (limits, addresses, NET_ADMIN,
    workers' commands) with node 0 as the testbed's master and the run's folder at /out."""
    from edgetp.ops.testbed.dockerrun import testbed_compose

    config = load_cluster_config(REPO / "configs" / "docker-testbed.yaml")
    home, run = compose()["services"], testbed_compose(config, tmp_path)["services"]
    assert list(run) == list(home)
    for name, service in run.items():
        for key in ("image", "mem_limit", "cpus", "cap_add", "networks", "hostname"):
            assert service[key] == home[name][key]
        assert "build" not in service and "ports" not in service
        assert f"{tmp_path}:/out:{'rw' if name == 'master' else 'ro'}" in service["volumes"]
        assert service["environment"]["EDGETP_LINK_PROFILE"] == "home-wifi"
        assert service["environment"]["EDGETP_LINK_PROFILES"] == "/out/links.yaml"
        if name != "master":
            assert service["command"] == home[name]["command"]
    assert run["master"]["command"] == ["testbed", "--master-role", "/out/master-spec.json"]
