"""The Docker side of the Docker testbed: a compose project (``docker compose`` v2, else
Compose v1's ``docker-compose``) brought up and taken down, its containers, their logs, their
memory cgroups (limit and peak, watched while they run) and what of a project is left.

Everything goes through the ``docker`` command line; nothing here needs root, only the right
to use the engine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgetp.core.settings import ENV_DESCRIPTION, LINK_VARIABLES
from edgetp.ops.testbed.cgroups import V1_ROOT, V2_ROOT, NodeMemory, cgroup_memory
from edgetp.ops.testbed.resources import TestbedError

PROJECT_LABEL = "com.docker.compose.project"
WATCH_INTERVAL_S = 0.2  # how often the memory watch reads the containers' cgroups


def docker(*args: str, timeout: float = 60, check: bool = True) -> str:
    """``docker ARGS``'s output; a failure is a :class:`TestbedError` with docker's words."""
    if shutil.which("docker") is None:
        raise TestbedError("docker not found: install Docker (docker/README.md)")
    try:
        result = subprocess.run(["docker", *args], capture_output=True, text=True,
                                timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"docker {' '.join(args[:2])} took more than {timeout:g} s") from exc
    if check and result.returncode != 0:
        raise TestbedError(f"docker {' '.join(args[:3])} failed: "
                           f"{(result.stderr or result.stdout).strip()[-500:]}")
    return result.stdout


def compose_command() -> list[str]:
    """``docker compose`` where the plugin is installed, else ``docker-compose`` (v1)."""
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise TestbedError("neither `docker compose` nor `docker-compose` is installed "
                       "(Debian: apt-get install docker-compose)")


def require_engine() -> None:
    if shutil.which("docker") is None or subprocess.run(
            ["docker", "info"], capture_output=True, timeout=60, check=False).returncode != 0:
        raise TestbedError("no Docker engine answers (docker info failed): start one, e.g. "
                           "docker/engine.sh run CMD (docker/README.md)")


def require_image(image: str) -> None:
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=60,
                      check=False).returncode != 0:
        raise TestbedError(f"image {image} not found: build it with docker/build-offline.sh "
                           "(no registry) or docker compose -f docker/compose.yaml build")


@dataclass
class ComposeProject:
    """One compose project: ``name`` (compose's ``-p``), its file, and the variables the file
    reads (``EDGETP_SHARDS``, ``EDGETP_API_PORT`` ...)."""

    name: str
    file: Path
    env: dict[str, str] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 180) -> str:
        command = [*compose_command(), "-p", self.name, "-f", str(self.file), *args]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                    env={**os.environ, **self.env}, check=False)
        except subprocess.TimeoutExpired as exc:
            raise TestbedError(f"compose {args[0]} took more than {timeout:g} s") from exc
        if result.returncode != 0:
            raise TestbedError(f"compose {' '.join(args)} failed: "
                               f"{(result.stderr or result.stdout).strip()[-800:]}")
        return result.stdout

    def up(self) -> None:
        self.compose("up", "--detach", "--no-build")

    def down(self) -> None:
        """Remove the project's containers, networks and volumes."""
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10")

    def container(self, service: str) -> str:
        """The id of ``service``'s container (stopped ones too)."""
        ids = self.compose("ps", "--quiet", service).split()
        if not ids:
            raise TestbedError(f"compose project {self.name} has no container for {service}")
        return ids[0]

    def leftovers(self) -> list[str]:
        """What of the project is still there: containers, networks, volumes."""
        label = f"label={PROJECT_LABEL}={self.name}"
        found = docker("ps", "--all", "--quiet", "--filter", label).split()
        found += docker("network", "ls", "--quiet", "--filter", label).split()
        found += docker("volume", "ls", "--quiet", "--filter", label).split()
        return found


def container_name(container: str) -> str:
    return docker("inspect", "--format", "{{.Name}}", container).strip().lstrip("/")


def is_running(container: str) -> bool:
    state = docker("inspect", "--format", "{{.State.Running}}", container, check=False)
    return state.strip() == "true"


def container_logs(container: str) -> str:
    result = subprocess.run(["docker", "logs", container], capture_output=True, text=True,
                            timeout=60, check=False)
    return result.stdout + result.stderr


def link_in_force(container: str, dev: str = "eth0", timeout_s: float = 60) -> dict[str, str]:
    """What shapes the container's link once its entrypoint has run: the qdisc ``tc`` shows on
    ``dev`` and the link variables in its main process's environment (the transport delay)."""
    deadline = time.monotonic() + timeout_s
    while True:
        environ = docker("exec", container, "cat", "/proc/1/environ", check=False)
        variables = dict(item.split("=", 1) for item in environ.split("\0") if "=" in item)
        if ENV_DESCRIPTION in variables or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # the entrypoint is still applying the profile
    qdisc = docker("exec", container, "tc", "qdisc", "show", "dev", dev, check=False).strip()
    return {"qdisc": qdisc, **{k: v for k, v in variables.items() if k in LINK_VARIABLES}}


def memory_cgroup(container: str) -> tuple[str, Path] | None:
    """The running container's memory cgroup, as ("v1"|"v2", directory), from its first
    process's /proc/PID/cgroup; None once it has stopped."""
    pid = docker("inspect", "--format", "{{.State.Pid}}", container, check=False).strip()
    if not pid.isdigit() or pid == "0":
        return None
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return "v1", V1_ROOT / path.lstrip("/")
    for line in lines:
        if line.startswith("0::"):
            return "v2", V2_ROOT / line[3:].lstrip("/")
    return None


def container_memory(container: str) -> NodeMemory:
    """The running container's cgroup memory limit and peak so far."""
    cgroup = memory_cgroup(container)
    return cgroup_memory(*cgroup) if cgroup else (None, None)


class MemoryWatch:
    """Reads the containers' cgroup limits and peaks every :data:`WATCH_INTERVAL_S` while
    they run: a cgroup goes with its container, so what was last read before the container
    stopped is its peak (up to the last interval)."""

    def __init__(self, containers: list[str]) -> None:
        self.containers = containers
        self.memory: list[NodeMemory] = [(None, None)] * len(containers)
        self._cgroups: list[tuple[str, Path] | None] = [None] * len(containers)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="memory-watch")

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.read_once()
            self._stop.wait(WATCH_INTERVAL_S)

    def read_once(self) -> None:
        for k, container in enumerate(self.containers):
            if self._cgroups[k] is None:
                self._cgroups[k] = memory_cgroup(container)
            cgroup = self._cgroups[k]
            if cgroup is None:
                continue
            limit, peak = cgroup_memory(*cgroup)
            if peak is not None:  # None: the cgroup is gone with its container
                self.memory[k] = (limit, max(peak, self.memory[k][1] or 0))
