"""Link emulation: profiles, the tc choice (netem, else tbf + the transport hook), and the
measured cost of a star allreduce over a 5 ms link (the Docker entrypoint and tc itself:
tests/integration/test_link_shaping.py)."""

from __future__ import annotations

import statistics
import subprocess
import threading
import time

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


def test_a_two_rank_allreduce_over_a_5ms_link_takes_one_traversal(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    baseline = statistics.median(measure_allreduce_ms(monkeypatch, 0))
    delayed = measure_allreduce_ms(monkeypatch, 5.0)
    median = statistics.median(delayed)
    with capsys.disabled():
        print(f"\nstar allreduce, 2 ranks on loopback: {baseline:.2f} ms without emulation, "
              f"{median:.2f} ms median (min {min(delayed):.2f}, max {max(delayed):.2f}) "
              "with a 5 ms link profile (transport delay)")
    assert baseline < 5.0
    # two ranks on the data link exchange partials: both cross the link at once, so one
    # traversal (the star's partial-then-sum took two, >= 10 ms)
    assert min(delayed) >= 5.0, "each partial crosses the emulated link"
    assert median < 10.0, "the two partials cross at once, not one after the other"


def test_profile_summary() -> None:
    assert LinkProfile("x", 1.5).summary() == "x: 1.5 ms per traversal, unlimited"
