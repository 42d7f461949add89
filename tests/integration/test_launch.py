"""`edgetp launch` / `status` / `launch --stop` against SSH to this machine.

Real SSH when possible: as root with apt, OpenSSH's server is installed if missing and an sshd
is started on a free loopback port with a temporary config, host key and client key (and
stopped afterwards: the test fails if any process of it survives). Otherwise (not root, no apt,
or EDGETP_TEST_SSH=fake) a fake ``ssh`` on PATH runs the command locally. Every test prints
which one ran.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgetp.config.cluster import load_cluster_config
from edgetp.model.demo import DEMO_MODEL_DIR, expected_text
from edgetp.ops.launch import Launcher, stop_cluster
from edgetp.ops.launch.shell import NodeShell
from edgetp.ops.launch.shipping import choose_method, local_files, ship
from edgetp.shard.split import split_checkpoint

FAKE_SSH = """#!/bin/sh
# a fake ssh for tests: skip the options and the host, run the command here
while [ $# -gt 0 ]; do
    case "$1" in
        -o|-p|-i|-l|-F|-E|-J|-O) shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
shift
exec sh -c "$*"
"""


@dataclass
class SshSetup:
    kind: str  # "openssh" or "fake"
    options: list[str] = field(default_factory=list)
    port: int | None = None
    user: str = ""
    path_prefix: str = ""  # prepended to PATH (the fake ssh)
    why: str = ""

    def target(self, host: str = "127.0.0.1") -> str:
        return f"{self.user}@{host}" + (f":{self.port}" if self.port else "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _apt_install(package: str) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in range(2):
        result = subprocess.run(["apt-get", "install", "-y", "-q", package], env=env,
                                capture_output=True, timeout=900, check=False)
        if result.returncode == 0:
            return True
        if attempt == 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=900,
                           check=False)
    return False


def _sshd_binary() -> str | None:
    if os.environ.get("EDGETP_TEST_SSH") == "fake":
        return None
    if sys.platform != "linux" or os.geteuid() != 0:
        return None
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if found is None and shutil.which("apt-get") and _apt_install("openssh-server"):
        found = "/usr/sbin/sshd"
    return found


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (sshd's per-connection sessions)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.contextmanager
def openssh(sshd: str, root: Path) -> Iterator[SshSetup]:
    root.mkdir(mode=0o700)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)],
                       check=True)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    (root / "authorized_keys").chmod(0o600)
    port = free_port()
    config = root / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host_key'}",
        f"AuthorizedKeysFile {root / 'authorized_keys'}", "PubkeyAuthentication yes",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no",
        f"PidFile {root / 'sshd.pid'}", "LogLevel ERROR", ""]))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=open(root / "sshd.log", "wb"))  # noqa: SIM115
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("sshd did not start: " + (root / "sshd.log").read_text())
            time.sleep(0.05)
        yield SshSetup("openssh", ["-i", str(root / "client_key"), "-o",
                                   "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                                   "-o", "LogLevel=ERROR"], port, getpass.getuser())
    finally:
        sessions = _descendants(proc.pid)  # sessions outlive the listener: they must be over
        proc.terminate()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in sessions) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [pid for pid in sessions if _alive(pid)]
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not survivors, f"sshd sessions survived the test: {survivors}"


@pytest.fixture(scope="module")
def ssh_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshSetup]:
    root = tmp_path_factory.mktemp("ssh")
    sshd = _sshd_binary()
    if sshd is not None:
        with openssh(sshd, root / "sshd") as setup:
            yield setup
        return
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    why = ("EDGETP_TEST_SSH=fake" if os.environ.get("EDGETP_TEST_SSH") == "fake"
           else "not root, or no apt to install openssh-server")
    yield SshSetup("fake", [], None, getpass.getuser(), str(bin_dir), why)


@pytest.fixture
def ssh(ssh_setup: SshSetup, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> SshSetup:
    if ssh_setup.path_prefix:
        monkeypatch.setenv("PATH", ssh_setup.path_prefix + os.pathsep + os.environ["PATH"])
    with capsys.disabled():
        print(f"\n[ssh path: {ssh_setup.kind}"
              + (f" sshd on 127.0.0.1:{ssh_setup.port}]" if ssh_setup.port
                 else f": {ssh_setup.why}]"))
    return ssh_setup


def write_cluster(root: Path, ssh: SshSetup, n: int, **extra: Any) -> Path:
    nodes = [{"name": "here", "address": "127.0.0.1", "shard_dir": str(root / "n0" / "rank-0"),
              "cache_dir": str(root / "n0" / "cache"), "memory_budget": "64MiB"}]
    for k in range(1, n):
        nodes.append({"name": f"box{k}", "address": f"127.0.0.{k + 1}", "ssh": ssh.target(),
                      "python": sys.executable, "shard_dir": str(root / f"n{k}" / "shard"),
                      "cache_dir": str(root / f"n{k}" / "cache"), "threads": 1,
                      "link": "gigabit"})
    port = free_port()
    data = {"name": "t", "model": str(DEMO_MODEL_DIR), "split_dir": str(root / "split"),
            "master": {"address": "127.0.0.1", "port": port, "bind": f"tcp://127.0.0.1:{port}"},
            "ssh_options": ssh.options, "timeout": 5, "nodes": nodes, **extra}
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "edgetp.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)


def test_ship_copies_only_what_differs_and_resumes(ssh: SshSetup, tmp_path: Path) -> None:
    config = load_cluster_config(write_cluster(tmp_path, ssh, 2))
    split_checkpoint(DEMO_MODEL_DIR, tmp_path / "split", 2)
    source = tmp_path / "split" / "rank-1"
    shell = NodeShell(config, config.nodes[1])
    dest = config.nodes[1].shard_dir
    files = local_files(source)
    assert list(files)[-1] == "manifest.json"

    first = ship(shell, source, dest, "stream")
    assert first.copied == list(files) and first.method == "one ssh stream (resumable files)"
    assert ship(shell, source, dest, "stream").copied == []  # checksums equal: nothing to send

    layer = Path(dest) / "layer-002.safetensors"
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    layer.write_bytes(bytes(data))
    assert ship(shell, source, dest, "stream").copied == ["layer-002.safetensors"]

    # an interrupted copy: half of the file as .part resumes from there
    layer.unlink()
    full = (source / "layer-002.safetensors").read_bytes()
    (Path(dest) / ".layer-002.safetensors.part").write_bytes(full[: len(full) // 2])
    resumed = ship(shell, source, dest, "stream")
    assert resumed.copied == ["layer-002.safetensors"]
    assert resumed.bytes_sent == len(full) - len(full) // 2
    assert layer.read_bytes() == full

    if shutil.which("rsync"):
        layer.unlink()
        method = choose_method(shell, True, "auto")
        assert method == "rsync"
        result = ship(shell, source, dest, method)
        assert result.copied == ["layer-002.safetensors"] and "rsync" in result.method
        assert layer.read_bytes() == full


@pytest.mark.parametrize("outside", ["../../secret.safetensors", "ABSOLUTE"])
def test_ship_refuses_a_manifest_naming_files_outside_its_rank_directory(
        ssh: SshSetup, tmp_path: Path, outside: str) -> None:
    """A tampered manifest (an absolute name, ``../``) makes launch read nothing outside the
    rank directory and send nothing; asked directly, the node refuses such a name too."""
    from edgetp.ops.launch.shell import LaunchError

    config = load_cluster_config(write_cluster(tmp_path, ssh, 2))
    split_checkpoint(DEMO_MODEL_DIR, tmp_path / "split", 2)
    source = tmp_path / "split" / "rank-1"
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"the user's private key")
    name = str(secret) if outside == "ABSOLUTE" else outside
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["files"][name] = {"size": secret.stat().st_size, "tensors": {},
                               "sha256": hashlib.sha256(secret.read_bytes()).hexdigest()}
    (source / "manifest.json").write_text(json.dumps(manifest))
    shell = NodeShell(config, config.nodes[1])
    dest = Path(config.nodes[1].shard_dir)
    with pytest.raises(LaunchError, match="which no split writes") as refused:
        ship(shell, source, str(dest), "stream")
    assert repr(name) in str(refused.value) and "edgetp split" in str(refused.value)
    assert not dest.exists()  # refused before anything went to the node
    with pytest.raises(LaunchError, match="refusing the file name"):  # the node's own check
        shell.remote("check", {"dir": str(dest), "files": {name: [1, "0" * 64]}})
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and p != secret
              and p.read_bytes() == secret.read_bytes()]
    assert leaked == []


def status_rows(cluster: Path) -> list[dict[str, Any]]:
    result = run_cli("status", str(cluster), "--json")
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def test_launch_status_stop(ssh: SshSetup, tmp_path: Path) -> None:
    """Two nodes: status, launch (ship, start the worker over ssh, generate), status, stop."""
    cluster = write_cluster(tmp_path, ssh, 2)
    config = load_cluster_config(cluster)
    try:
        rows = status_rows(cluster)
        assert [r["up"] for r in rows] == [True, True]
        assert all(r["edgetp"] and r["python"] for r in rows)
        assert rows[1]["rtt_ms"] is not None and not rows[1]["running"]

        launched = run_cli("launch", str(cluster), "--prompt", "count by 3 : 5",
                           "--max-new-tokens", "40", "--transfer", "stream")
        assert launched.returncode == 0, launched.stderr
        assert launched.stdout.strip() == expected_text(3, 5)
        assert "copied 5 file(s)" in launched.stderr and "ssh stream" in launched.stderr
        assert "all workers joined" in launched.stderr

        rows = status_rows(cluster)
        assert [bool(r["running"]) for r in rows] == [False, True]  # the worker stays up
        assert all(r["shard_present"] for r in rows)
        log = Path(config.nodes[1].cache_dir) / "logs" / "t-box1.log"
        assert "joined master" in log.read_text()

        stopped = run_cli("launch", "--stop", str(cluster))
        assert stopped.returncode == 0 and "box1: worker stopped pid" in stopped.stderr
        assert not any(r["running"] for r in status_rows(cluster))
    finally:
        stop_cluster(config, lambda line: None, grace_s=2)


@pytest.mark.slow
def test_launch_three_nodes_twice(ssh: SshSetup, tmp_path: Path) -> None:
    """Three nodes; launching again restarts the workers and ships nothing."""
    cluster = write_cluster(tmp_path, ssh, 3)
    config = load_cluster_config(cluster)
    try:
        for step, start in ((3, 5), (4, 3)):
            launched = run_cli("launch", str(cluster), "--prompt", f"count by {step} : {start}",
                               "--max-new-tokens", "40")
            assert launched.returncode == 0, launched.stderr
            assert launched.stdout.strip() == expected_text(step, start)
        assert "box1: all 5 files up to date" in launched.stderr
        assert "box2: all 5 files up to date" in launched.stderr
        assert [bool(r["running"]) for r in status_rows(cluster)] == [False, True, True]
    finally:
        stop_cluster(config, lambda line: None, grace_s=2)
    assert not any(r["running"] for r in status_rows(cluster))


def test_unreachable_node_and_missing_python_are_clear(ssh: SshSetup, tmp_path: Path) -> None:
    cluster = write_cluster(tmp_path, ssh, 2)
    data = yaml.safe_load(cluster.read_text())
    data["nodes"][1]["python"] = "/nonexistent/python3"
    cluster.write_text(yaml.safe_dump(data))
    result = run_cli("launch", str(cluster), "--prompt", "x")
    assert result.returncode == 1
    assert "/nonexistent/python3 not found" in result.stderr and "python:" in result.stderr


@pytest.mark.slow
def test_launch_with_curve_keys(ssh: SshSetup, tmp_path: Path) -> None:
    """security.curve: key pairs are made, the worker's secret and the master's public key go
    to the worker over ssh, and the worker joins over an encrypted, authenticated link."""
    keys = tmp_path / "keys"
    cluster = write_cluster(tmp_path, ssh, 2, security={"curve": True, "keys_dir": str(keys)})
    config = load_cluster_config(cluster)
    try:
        launched = run_cli("launch", str(cluster), "--prompt", "count by 5 : 2",
                           "--max-new-tokens", "40")
        assert launched.returncode == 0, launched.stderr
        assert launched.stdout.strip() == expected_text(5, 2)
        assert (keys / "authorized" / "box1.key").is_file()
        shipped = Path(config.nodes[1].cache_dir) / "keys"
        assert (shipped / "box1.key_secret").stat().st_mode & 0o077 == 0
        assert (shipped / "master.key").is_file()
        log = (Path(config.nodes[1].cache_dir) / "logs" / "t-box1.log").read_text()
        assert "--key" in log and "--insecure" not in log
    finally:
        stop_cluster(config, lambda line: None, grace_s=2)


def test_emulated_links_reach_the_processes_env(tmp_path: Path) -> None:
    config = load_cluster_config(write_cluster(tmp_path, SshSetup("fake", user="me"), 2))
    assert Launcher(config).node_env(config.nodes[1]) == {"OMP_NUM_THREADS": "1"}
    env = Launcher(config, emulate_links=True).node_env(config.nodes[1])
    assert env["EDGETP_LINK_DELAY_MS"] == "0.2"  # box1's gigabit profile
    assert env["EDGETP_LINK_EMULATION"] == ("gigabit: bandwidth not limited + transport delay "
                                            "0.2ms per traversal (launch --emulate-links: no tc)")
    argv = Launcher(config).worker_argv(config.nodes[1])
    assert argv[1:5] == ["-m", "edgetp.cli", "worker", "--shard"]
    assert argv[argv.index("--master") + 1] == config.master.url
