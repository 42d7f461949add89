"""No open door on a worker: every TCP port a real worker process listens on, flooded from
another process, leaves its memory within a small bound, and the cluster still answers right.

With the star a joined worker listens nowhere (the ring's listener opens only when the master
runs the ring; the data link's only while joining); with the ring it listens on one port, on
loopback (the interface it reaches this master from), which admits only its cluster: the
holder of its token without keys, the cluster's keys by CURVE with keys.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers.cluster import running_cluster
from helpers.paths import REPO
from helpers.processes import run

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.runtime.master import Master, Prompt

FLOOD = REPO / "tests" / "helpers" / "flood.py"
MESSAGES, MESSAGE_BYTES = 10, 30 << 20  # per peer: 300 MiB each, were they all taken
BOUND = 64 << 20  # what the worker's resident memory may grow by under the flood
MODES: dict[str, dict[str, Any]] = {
    "star": {},
    "ring": {"allreduce": "ring"},
    "ring with keys": {"allreduce": "ring", "secure": True},
}


def listening(pid: int) -> list[tuple[str, int]]:
    """The (address, port) of every TCP socket process ``pid`` listens on."""
    return sorted((c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN)


def answer(master: Master) -> str:
    gen = GenerationConfig(max_new_tokens=40)
    return master.generate(Prompt(demo_prompt(5, 7)), SamplingConfig(), gen).text.strip()


# with keys the flood takes 14 s: run with the slow tests
FLOOD_MODES = [pytest.param(m, marks=pytest.mark.slow) if m == "ring with keys" else m
               for m in sorted(MODES)]


@pytest.mark.parametrize("mode", FLOOD_MODES)
def test_a_flood_at_every_port_a_worker_listens_on_leaves_its_memory_bounded(
        tmp_path: Path, mode: str) -> None:
    with running_cluster(DEMO_MODEL_DIR, 2, tmp_path, timeout_s=10.0, **MODES[mode]) as cluster:
        master = cluster.master
        assert master is not None
        assert answer(master) == expected_text(5, 7)
        worker = psutil.Process(cluster.workers[1].pid)
        ports = listening(worker.pid)
        before = worker.memory_info().rss
        for host, port in ports:
            run([sys.executable, str(FLOOD), host, str(port), "--messages", str(MESSAGES),
                 "--size", str(MESSAGE_BYTES)], timeout=120, check=True)
        time.sleep(1.0)  # what was taken in is in the worker's memory now
        grown = worker.memory_info().rss - before
        assert grown < BOUND, f"the flood at {ports} grew the worker by {grown / 2**20:.0f} MiB"
        assert answer(master) == expected_text(5, 7)
        assert all(host == "127.0.0.1" for host, _ in ports), ports  # never 0.0.0.0
        assert len(ports) == (0 if mode == "star" else 1), ports
