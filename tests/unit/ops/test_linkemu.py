"""Link emulation: profiles, the tc choice (netem, else tbf + the transport hook), the shared
entrypoint, and the measured cost of a star allreduce over a 5 ms link."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from helpers.paths import REPO

from edgetp.config.links import BUILTIN_PROFILES, LinkProfile, transport_only
from edgetp.core.errors import ConfigError
from edgetp.core.settings import ENV_DELAY, ENV_DESCRIPTION, ENV_JITTER
from edgetp.net.collectives import StarMaster, StarWorker
from edgetp.net.delay import LinkDelay
from edgetp.net.transport import MasterTransport, NodeIdentity, WorkerTransport
from edgetp.ops.linkemu import apply, main

WIFI = BUILTIN_PROFILES["home-wifi"]


def completed(code: int, err: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess([], code, "", err)


def test_netem_when_the_kernel_has_it() -> None:
    calls: list[list[str]] = []
    emulation = apply(WIFI, "eth0", lambda cmd: calls.append(cmd) or completed(0))
    assert calls == [["tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", "5ms",
                      "2ms", "rate", "100mbit"]]
    assert not emulation.transport_delay
    env = emulation.env()
    assert env[ENV_DELAY] == "0"
    assert env[ENV_DESCRIPTION] == "home-wifi: tc netem delay 5ms 2ms rate 100mbit on eth0"


def test_tbf_and_the_transport_delay_without_netem() -> None:
    calls: list[list[str]] = []

    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return completed(2, "Error: Specified qdisc kind is unknown.") if "netem" in cmd \
            else completed(0)

    emulation = apply(WIFI, "eth0", run)
    assert [c[6] for c in calls] == ["netem", "tbf"]
    assert calls[1][6:9] == ["tbf", "rate", "100mbit"]
    env = emulation.env()
    assert (env[ENV_DELAY], env[ENV_JITTER]) == ("5", "2")
    assert env[ENV_DESCRIPTION] == (
        "home-wifi: tc tbf rate 100mbit on eth0 + transport delay 5ms +-2ms per traversal "
        "(netem unavailable: Error: Specified qdisc kind is unknown.)")


def test_without_tc_only_the_delay_and_it_says_so() -> None:
    emulation = apply(WIFI, "eth0", lambda cmd: completed(127, "No such file: tc"))
    text = emulation.description()
    assert "bandwidth not limited" in text and "transport delay 5ms" in text
    assert "tbf failed" in text
    assert transport_only(BUILTIN_PROFILES["tpi-llm"], "no root").env()[ENV_DELAY] == "1"


def test_link_delay_reads_the_environment_once_and_delays_data_only() -> None:
    assert not LinkDelay.from_env({}).active
    delay = LinkDelay.from_env({ENV_DELAY: "20"})
    started = time.perf_counter()
    delay.before_send("ping")
    delay.before_send("hello")
    assert time.perf_counter() - started < 0.01
    started = time.perf_counter()
    delay.before_send("partial")
    assert 0.019 < time.perf_counter() - started < 0.05
    with pytest.raises(ConfigError, match="EDGETP_LINK_DELAY_MS='x'"):
        LinkDelay.from_env({ENV_DELAY: "x"})
    with pytest.raises(ConfigError, match=">= 0"):
        LinkDelay.from_env({ENV_JITTER: "-1"})


def test_apply_command_prints_exports(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apply", "--profile", "nope"]) == 2
    assert "unknown link profile 'nope'" in capsys.readouterr().err
    assert main(["show", "--profiles", str(REPO / "configs" / "links.yaml")]) == 0
    assert "home-wifi: 5 ms +-2 ms per traversal, 100 Mbit/s" in capsys.readouterr().out


def test_the_entrypoint_applies_the_profile_then_runs_edgetp(tmp_path: Path) -> None:
    """docker/entrypoint.sh, with a python that reports what edgetp would have been run with."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "edgetp.ops.linkemu" ]; then exec {sys.executable} "$@"; fi
echo "args=$*"; echo "delay=$EDGETP_LINK_DELAY_MS"; echo "emulation=$EDGETP_LINK_EMULATION"
""")
    fake.chmod(0o755)
    env = {**os.environ, "EDGETP_PYTHON": str(fake), "EDGETP_LINK_PROFILE": "home-wifi",
           "EDGETP_LINK_DEV": f"nodev{uuid.uuid4().hex[:6]}"}  # tc fails: nothing is shaped
    result = subprocess.run([str(REPO / "docker" / "entrypoint.sh"), "worker", "--shard", "x y"],
                            env=env, capture_output=True, text=True, timeout=60, check=True)
    lines = result.stdout.splitlines()
    assert lines[0] == "args=-m edgetp.cli worker --shard x y"
    assert lines[1] == "delay=5"
    assert lines[2].startswith("emulation=home-wifi: bandwidth not limited + transport delay 5ms")
    env.pop("EDGETP_LINK_PROFILE")
    result = subprocess.run([str(REPO / "docker" / "entrypoint.sh"), "--version"], env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.splitlines()[1:] == ["delay=", "emulation=none"]


@pytest.mark.skipif(not (sys.platform == "linux" and os.geteuid() == 0 and shutil.which("tc")),
                    reason="needs root, Linux and tc (a throwaway network namespace)")
def test_real_tc_in_a_namespace() -> None:
    ns = f"edgetp-linkemu-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "edgetp.ops.linkemu",
                              "apply", "--profile", "home-wifi", "--dev", "lo"],
                             capture_output=True, text=True, check=True, cwd=REPO).stdout
        qdisc = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", "lo"],
                               capture_output=True, text=True, check=True).stdout
        if "netem" in qdisc:
            assert "export EDGETP_LINK_DELAY_MS=0" in out and "delay 5ms" in qdisc
        else:  # this kernel has no netem: tbf for the rate, the transport for the delay
            assert "tbf" in qdisc and "rate 100Mbit" in qdisc
            assert "export EDGETP_LINK_DELAY_MS=5" in out
            assert "transport delay 5ms" in out
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


# -- the measured allreduce ---------------------------------------------------------------------


def identity(rank: int) -> NodeIdentity:
    return NodeIdentity(rank, "linkemu-test", '{"test": 1}', "float32")


def measure_allreduce_ms(monkeypatch: pytest.MonkeyPatch, delay_ms: float,
                         count: int = 16) -> list[float]:
    """Worker-side times of star allreduces (real StarMaster/StarWorker over loopback)."""
    monkeypatch.setenv(ENV_DELAY, str(delay_ms))
    monkeypatch.setenv(ENV_JITTER, "0")
    master_t = MasterTransport("tcp://127.0.0.1:*", identity(0), 2, "f32", 10.0)
    worker_t = WorkerTransport(master_t.address, identity(1), 10.0)
    try:
        joined = threading.Thread(target=worker_t.connect, args=(10.0,), daemon=True)
        joined.start()
        master_t.wait_for_workers(10.0)
        joined.join(10.0)
        master, worker = StarMaster(master_t, "f32", 10.0), StarWorker(worker_t, 1, 2, 10.0)
        x = torch.ones(1, 256)
        times: list[float] = []

        def worker_side() -> None:
            worker.position.begin(1, 0, count + 1)
            for _ in range(count):
                started = time.perf_counter()
                worker.allreduce(x.clone())
                times.append((time.perf_counter() - started) * 1000)
            worker.allreduce(x.clone())  # the step's last: a reduce

        thread = threading.Thread(target=worker_side, daemon=True)
        with master_t.lock:  # as a request holds it: the heartbeat thread stays out
            master.position.begin(1, 0, count + 1)
            thread.start()
            for _ in range(count + 1):
                # (a clone: StarMaster sums into its input when the wire dtype is the same)
                assert torch.equal(master.allreduce(x.clone()), 2 * x)
        thread.join(10.0)
        assert not thread.is_alive() and len(times) == count
        return times[1:]  # the first one waited for the thread to start
    finally:
        worker_t.close()
        master_t.close()


def test_allreduce_over_a_5ms_link_takes_two_traversals(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    baseline = statistics.median(measure_allreduce_ms(monkeypatch, 0))
    delayed = measure_allreduce_ms(monkeypatch, 5.0)
    median = statistics.median(delayed)
    with capsys.disabled():
        print(f"\nstar allreduce, 2 ranks on loopback: {baseline:.2f} ms without emulation, "
              f"{median:.2f} ms median (min {min(delayed):.2f}, max {max(delayed):.2f}) "
              "with a 5 ms link profile (transport delay)")
    assert baseline < 5.0
    assert min(delayed) >= 10.0, "each allreduce crosses the link twice (partial, then sum)"
    assert median < 25.0


def test_profile_summary() -> None:
    assert LinkProfile("x", 1.5).summary() == "x: 1.5 ms per traversal, unlimited"
