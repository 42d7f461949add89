"""The parts of edgetp.ops.testbed that need no root: the names it gives what it creates (and
finds again when cleaning up), memory limits and cgroup files, signals around the cleanup,
watching the node processes, and the report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgetp.config.cluster import NodeConfig
from edgetp.core.errors import ConfigError
from edgetp.ops.testbed import report, resources  # (modules: pytest would collect test* names)
from edgetp.ops.testbed.cgroups import RUNTIME_OVERHEAD, cgroup_peak, make_cgroup, node_memory_limit
from edgetp.ops.testbed.processes import wait_for_master, worker_args
from edgetp.ops.testbed.resources import (
    CGROUP_NAMES,
    LINK_NAMES,
    NS_NAMES,
    bridge_name,
    cgroup_group_name,
    namespace_name,
    shielded,
    signals_raise,
    veth_names,
)
from edgetp.ops.testbed.run import flags_config


def test_cleanup_finds_every_name_a_testbed_gives() -> None:
    tag = "0f3a"
    assert LINK_NAMES.match(bridge_name(tag))
    assert all(LINK_NAMES.match(name) for name in veth_names(tag, 12))
    assert NS_NAMES.match(namespace_name(tag, 12))
    assert CGROUP_NAMES.match(cgroup_group_name(tag))
    assert all(len(name) <= 15 for name in (bridge_name(tag), *veth_names(tag, 199)))  # IFNAMSIZ
    for other in ("eth0", "docker0", "edgetp-x-1", "edgetp-testbed"):  # never someone else's
        assert not (LINK_NAMES.match(other) or NS_NAMES.match(other) or
                    CGROUP_NAMES.match(other))


def test_memory_limits() -> None:
    node = NodeConfig(rank=1, name="n", address="10.77.0.2", shard_dir="s")
    assert node_memory_limit(node) == 4 * 2**30
    budget = NodeConfig(rank=1, name="n", address="a", shard_dir="s", memory_budget=2**28)
    assert node_memory_limit(budget) == 2**28 + RUNTIME_OVERHEAD
    limit = NodeConfig(rank=1, name="n", address="a", shard_dir="s", memory_budget=2**28,
                       memory_limit=2**30)
    assert node_memory_limit(limit) == 2**30


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_cgroup_files(tmp_path: Path, kind: str) -> None:
    """On a stand-in directory: which files a cgroup of each version gets, and its peak."""
    created: list[Path] = []
    cgroup = make_cgroup(kind, tmp_path, "edgetp-testbed-0f3a", "node-1", 3 * 2**30, created)
    assert created == [tmp_path / "edgetp-testbed-0f3a", cgroup] and cgroup.name == "node-1"
    limit, swap, peak = (("memory.limit_in_bytes", "memory.memsw.limit_in_bytes",
                          "memory.max_usage_in_bytes") if kind == "v1" else
                         ("memory.max", "memory.swap.max", "memory.peak"))
    assert (cgroup / limit).read_text() == str(3 * 2**30)
    assert (cgroup / swap).read_text() == (str(3 * 2**30) if kind == "v1" else "0")
    assert cgroup_peak(kind, cgroup) is None
    (cgroup / peak).write_text("123456\n")
    assert cgroup_peak(kind, cgroup) == 123456


def test_signals_interrupt_the_run_and_not_its_cleanup() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), signals_raise():
        os.kill(os.getpid(), signal.SIGTERM)
    with shielded():
        os.kill(os.getpid(), signal.SIGHUP)  # ignored
    assert signal.getsignal(signal.SIGTERM) == before


def test_workers_run_insecure_with_their_budget(tmp_path: Path) -> None:
    config = flags_config(tmp_path, 3, None, "64MiB", None, None, tmp_path / "out")
    args = worker_args(config, config.nodes[2])
    assert args[:3] == ["worker", "--shard", str(tmp_path / "out" / "split" / "rank-2")]
    assert args[args.index("--master") + 1] == "tcp://10.77.0.1:5555"
    assert "--insecure" in args and args[args.index("--memory-budget") + 1] == "64MiB"


def test_a_ready_split_is_run_as_it_is(tmp_path: Path) -> None:
    """A split (edgetp synth-split writes one) is the nodes' split; nothing is split again."""
    from edgetp.model.synthetic import llama_config
    from edgetp.ops.testbed.run import _split
    from edgetp.shard.synthetic import write_synthetic_split

    config = llama_config(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=128)
    split = write_synthetic_split(config, tmp_path / "split", 2, "int8").out_dir
    cluster = flags_config(split, 2, None, None, None, None, tmp_path / "out")
    assert worker_args(cluster, cluster.nodes[1], 48)[:3] == ["worker", "--shard",
                                                               str(split / "rank-1")]
    assert "48" in worker_args(cluster, cluster.nodes[1], 48)
    assert _split(cluster, lambda _line: None) == split
    assert not (tmp_path / "out").exists()
    three = flags_config(split, 3, None, None, None, None, tmp_path / "out")
    (split / "rank-2").mkdir()
    with pytest.raises(ConfigError, match="for 2 nodes, the testbed has 3: run it with --nodes 2"):
        _split(three, lambda _line: None)


def test_a_failed_worker_ends_the_wait_with_its_log(tmp_path: Path) -> None:
    config = flags_config(tmp_path, 2, None, None, None, None, tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "node-1.log").write_text("Traceback ...\nboom\n")
    master = subprocess.Popen(["sleep", "30"])
    worker = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    try:
        with pytest.raises(resources.TestbedError, match=r"worker 1 \(node-1\) exited with status 3"
                                               r"(.|\n)*boom"):
            wait_for_master(master, [(config.nodes[1], worker)], 60, tmp_path)
        master.kill()
        master.wait()
        wait_for_master(master, [(config.nodes[1], worker)], 60, tmp_path)  # master done
    finally:
        for proc in (master, worker):
            proc.kill()
            proc.wait()


def test_report_markdown(tmp_path: Path) -> None:
    log = tmp_path / "node-0.log"
    log.write_text("starting\nedgetp.ops.linkemu: home-wifi: tc netem delay 5ms on eth0\n")
    assert report.emulation_line(log) == "home-wifi: tc netem delay 5ms on eth0"
    assert report.emulation_line(tmp_path / "missing.log") == "none"
    result = {"testbed": "network namespaces", "cluster": "testbed", "prompt": "count by 3 : 5",
              "nodes": [{"rank": 0, "name": "node-0", "namespace": "edgetp-0f3a-0",
                         "address": "10.77.0.1", "emulation": "none",
                         "memory_limit_bytes": 2**30, "cgroup_peak_bytes": 300 * 2**20}],
              "generation": {"text": "8 11", "generated_tokens": 2, "ttft_ms": 12.34,
                             "ms_per_token": 5.678},
              "error": "RuntimeError: x"}
    text = report.testbed_markdown(result)
    assert "| 0 | node-0 | edgetp-0f3a-0 | 10.77.0.1 | none | 1.00 GiB | 300.00 MiB |" in text
    assert "2 tokens, TTFT 12.3 ms, 5.68 ms/token" in text
    assert text.endswith("error: RuntimeError: x\n")
