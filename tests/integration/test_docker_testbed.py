"""The Docker testbed, run for real (``make test-docker``: a Docker engine and the edgetp:local
image, built offline by docker/build-offline.sh).

* ``edgetp testbed --docker`` on configs/docker-testbed.yaml: the demo model's known answer,
  the bench report, the link shaping in force in every container equal to what the report
  states, every container's peak memory under its limit, and nothing of the compose project
  left afterwards.
* docker/compose.yaml as a home user runs it (the API): the known answer over HTTP; a worker
  killed with ``docker kill`` fails the next request with a clear error naming its rank, and the
  cluster answers right again once the container is started again.
* The namespace testbed on the same cluster (same nodes, limits and links) gives the same
  answer, emulation and memory limits, run while the engine runs (whose firewall settings
  must not cut the namespaces' bridge).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.paths import REPO

from edgetp.config.cluster import load_cluster_config
from edgetp.model.demo import DEMO_MODEL_DIR, expected_text
from edgetp.ops.testbed.cgroups import node_memory_limit
from edgetp.ops.testbed.containers import (
    ComposeProject,
    container_logs,
    container_memory,
    docker,
    link_in_force,
)
from edgetp.ops.testbed.report import EMULATION_LINE

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

DOCKER_CONFIG = REPO / "configs" / "docker-testbed.yaml"
PROMPT, TOKENS = "count by 3 : 5", 40
ANSWER = expected_text(3, 5)
MiB = 2**20


def run_testbed_cli(*args: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "edgetp.cli", "testbed", *args, "--json",
                           "--prompt", PROMPT, "--max-new-tokens", str(TOKENS)],
                          capture_output=True, text=True, timeout=850, env=env, cwd=REPO,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def docker_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("docker-testbed")
    return run_testbed_cli("--docker", "--config", str(DOCKER_CONFIG), "--out", str(out),
                       str(DEMO_MODEL_DIR)), out


def assert_shaping_in_force(emulation: str, in_force: dict[str, str]) -> None:
    """The qdisc and the transport delay a container runs with are what its report line says."""
    assert in_force["EDGETP_LINK_EMULATION"] == emulation
    qdisc = in_force["qdisc"]
    if "tc netem" in emulation:
        assert "netem" in qdisc and "delay 5ms" in qdisc, qdisc
    else:
        assert "tc tbf rate 100mbit on eth0" in emulation
        assert qdisc.startswith("qdisc tbf ") and "rate 100Mbit" in qdisc, qdisc
    if "transport delay 5ms +-2ms" in emulation:
        assert (in_force["EDGETP_LINK_DELAY_MS"], in_force["EDGETP_LINK_JITTER_MS"]) == ("5", "2")
    else:
        assert "EDGETP_LINK_DELAY_MS" not in in_force


def test_docker_testbed_answers_benches_and_reports_what_was_in_force(
        docker_run: tuple[dict[str, Any], Path]) -> None:
    report, out = docker_run
    config = load_cluster_config(DOCKER_CONFIG)
    assert report["testbed"] == "docker containers"
    assert report["generation"]["text"] == ANSWER
    for node, expected in zip(report["nodes"], config.nodes, strict=True):
        assert node["name"] == expected.name and node["container"]
        assert node["emulation"].startswith("home-wifi: ")
        assert_shaping_in_force(node["emulation"], node["link_in_force"])
        limit = node_memory_limit(expected)
        assert node["memory_limit_bytes"] == node["cgroup_limit_bytes"] == limit
        assert 50 * MiB < node["cgroup_peak_bytes"] <= limit, node
    bench = json.loads((out / "bench" / "report.json").read_text())
    assert bench["settings"]["link_emulation"] == report["nodes"][0]["emulation"]
    assert bench["testbed"]["kind"] == "docker containers"
    assert len(bench["nodes"]) == 4
    for name in ("testbed.json", "testbed.md", "bench/report.md", "logs/worker-3.log"):
        assert (out / name).is_file(), name
    assert "home-wifi" in (out / "testbed.md").read_text()
    assert ComposeProject(report["compose_project"], out / "compose.yaml").leftovers() == []


# -- docker/compose.yaml as a home user runs it ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(port: int, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def complete(port: int) -> tuple[int, dict[str, Any]]:
    return http(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": TOKENS,
                                          "temperature": 0})


def wait_healthy(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    health: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            status, health = http(port, "/health")
            if status == 200:
                return
        except (OSError, ValueError):
            pass  # the server is not listening yet
        time.sleep(1)
    raise AssertionError(f"the cluster was not ready within {timeout_s:g} s: {health}")


@pytest.fixture
def home_compose(tmp_path: Path) -> Any:
    from edgetp.shard.split import split_checkpoint

    split_checkpoint(DEMO_MODEL_DIR, tmp_path / "shards", 4)
    port = free_port()
    compose_file = REPO / "docker" / "compose.yaml"
    project = ComposeProject(f"edgetp-home-{uuid.uuid4().hex[:4]}", compose_file,
                             {"EDGETP_SHARDS": str(tmp_path / "shards"),
                              "EDGETP_API_PORT": str(port)})
    project.up()
    try:
        yield project, port
    finally:
        project.down()
    assert project.leftovers() == [], "compose down left containers, networks or volumes"


def test_home_compose_answers_and_recovers_from_a_killed_worker(home_compose: Any) -> None:
    project, port = home_compose
    config = load_cluster_config(DOCKER_CONFIG)
    wait_healthy(port, 240)
    status, answer = complete(port)
    assert status == 200 and answer["choices"][0]["text"] == ANSWER
    for node in config.nodes:
        container = project.container(node.name)
        line = next(line for line in container_logs(container).splitlines()
                    if line.startswith(EMULATION_LINE))
        assert_shaping_in_force(line.removeprefix(EMULATION_LINE), link_in_force(container))
        limit, peak = container_memory(container)
        assert limit == node_memory_limit(node)
        assert peak is not None and 50 * MiB < peak <= limit

    worker = project.container("worker-2")
    docker("kill", worker)
    started = time.monotonic()
    status, error = complete(port)
    assert time.monotonic() - started < config.timeout_s + 5
    assert status == 503, error
    assert error["error"]["code"] in ("cluster_error", "cluster_unavailable")
    assert "rank 2" in error["error"]["message"] or "[2]" in error["error"]["message"], error

    docker("start", worker)
    wait_healthy(port, 120)
    status, answer = complete(port)
    assert status == 200 and answer["choices"][0]["text"] == ANSWER


# -- the namespace testbed on the same cluster ---------------------------------------------------


def namespace_config(tmp_path: Path) -> Path:
    """configs/docker-testbed.yaml for the namespace testbed: the same nodes, limits and links,
    the demo model split into tmp_path."""
    data = yaml.safe_load(DOCKER_CONFIG.read_text())
    split = tmp_path / "split"
    data.update(name="docker-testbed-in-namespaces", model=str(DEMO_MODEL_DIR),
                split_dir=str(split),
                link_profiles=str(REPO / "configs" / data["link_profiles"]))
    for rank, node in enumerate(data["nodes"]):
        node["shard_dir"] = str(split / f"rank-{rank}")
    path = tmp_path / "namespaces.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def forward_policy() -> str:
    if shutil.which("iptables") is None:
        return "ACCEPT"  # no iptables: nothing filters the bridge
    rules = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True,
                           check=False).stdout.splitlines()
    return rules[0].split()[-1] if rules else "ACCEPT"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="the namespace testbed needs root and iproute2")
def test_namespace_testbed_gives_the_docker_testbeds_results(
        docker_run: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    assert docker("info", "--format", "{{.ServerVersion}}").strip(), "no engine runs beside it"
    assert forward_policy() != "DROP", "the engine's FORWARD policy would cut the bridge"
    in_docker, _ = docker_run
    in_namespaces = run_testbed_cli("--config", str(namespace_config(tmp_path)),
                                "--out", str(tmp_path / "out"))
    assert in_namespaces["generation"]["text"] == in_docker["generation"]["text"] == ANSWER
    assert in_namespaces["generation"]["token_ids"] == in_docker["generation"]["token_ids"]
    for ns_node, docker_node in zip(in_namespaces["nodes"], in_docker["nodes"], strict=True):
        assert ns_node["name"] == docker_node["name"]
        assert ns_node["emulation"] == docker_node["emulation"]
        assert ns_node["memory_limit_bytes"] == docker_node["memory_limit_bytes"]
        assert ns_node["cgroup_limit_bytes"] == docker_node["cgroup_limit_bytes"]
        assert ns_node["cgroup_peak_bytes"] <= ns_node["cgroup_limit_bytes"]
    assert in_namespaces["bench"]["link_emulation"] == in_docker["bench"]["link_emulation"]
