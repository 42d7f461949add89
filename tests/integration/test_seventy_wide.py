"""The 70B benchmark's path in small: a 70B-wide model through a memory-limited worker.

A synthetic int4 split (``edgetp.shard.synthetic``) of Llama 2 70B's width (hidden 8192, 64
query heads over 8 KV heads, MLP 28672) with 2 layers and a small vocabulary, for 2 ranks
(540 MB each). The master runs in this process; the worker (``edgetp worker``) in a memory
cgroup (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``, no swap) of a python + torch +
edgetp process's baseline, a budget a little above its window's minimum (a ring of two of its
largest blocks: the 8192-wide MLP slices), and some slack. The run completes, generates
tokens, the worker's window streamed what did not fit, and the cgroup's peak stayed within its
limit, with nobody OOM-killed. ``benchmarks/seventy_b.py`` is the full-size run; the slow test
runs it on 4 layers (eight namespaces, root).

Skipped, with the reason, where no writable memory cgroup hierarchy exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import processes
from helpers.cgroup import CgroupUnavailable, cgroup_support, memory_cgroup

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.parallel.loader import shard_memory_needs
from edgetp.perf.presets import hf_config
from edgetp.runtime.local import free_port
from edgetp.runtime.master import Master
from edgetp.shard.synthetic import write_synthetic_split

MiB = 1 << 20
MAX_SEQ_LEN = 64
PROMPT = [1, 34, 211, 77, 412, 410, 19, 377, 5, 96, 300, 42]
NEW_TOKENS = 4
EXTRA_BUDGET = 48 * MiB  # above the worker's minimum: its attention blocks pinned, MLPs streamed
SLACK = 128 * MiB
TIMEOUT_S = 120.0
BASELINE_SCRIPT = r"""
import torch, zmq
import edgetp.cli.main, edgetp.parallel.loader, edgetp.runtime.worker
torch.randn(256, 256) @ torch.randn(256, 256)
print([int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0])
"""


@pytest.fixture(scope="module")
def cgroups_here() -> None:
    try:
        cgroup_support()
    except CgroupUnavailable as exc:
        pytest.skip(f"no usable memory cgroup: {exc}")


@pytest.fixture(scope="module")
def wide_split(cgroups_here, tmp_path_factory) -> list[Path]:
    config = {**hf_config("llama2-70b"), "num_hidden_layers": 2, "vocab_size": 512}
    return write_synthetic_split(config, tmp_path_factory.mktemp("wide") / "split", 2).rank_dirs


def baseline_rss() -> int:
    done = processes.run([sys.executable, "-c", BASELINE_SCRIPT], capture_output=True,
                         text=True, timeout=120, check=True, env=child_env())
    return int(done.stdout.strip().splitlines()[-1])


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "EDGETP_LOG": "WARNING"}


def test_a_70b_wide_model_streams_through_a_memory_limited_worker(wide_split, tmp_path):
    rank0, rank1 = wide_split
    needs = shard_memory_needs(rank1, max_seq_len=MAX_SEQ_LEN)
    budget = needs.minimum() + EXTRA_BUDGET
    assert budget < needs.total, "the budget must make the worker stream"
    limit = baseline_rss() + budget + SLACK
    address = f"tcp://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "edgetp.cli", "worker", "--shard", str(rank1), "--master",
               address, "--timeout", str(TIMEOUT_S), "--max-seq-len", str(MAX_SEQ_LEN),
               "--memory-budget", str(budget)]
    started: list[int] = []
    with memory_cgroup("wide-worker", limit, started) as group, \
            (tmp_path / "worker.log").open("wb") as log:
        worker = processes.spawn(group.wrap(command), stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=child_env())
        started.append(worker.pid)
        master = Master.cluster(rank0, address, "float32", MAX_SEQ_LEN, "f32", TIMEOUT_S)
        try:
            master.wait_for_workers(TIMEOUT_S)
            result = master.engine.generate(PROMPT, SamplingConfig(), GenerationConfig(
                max_new_tokens=NEW_TOKENS, stop_on_eos=False))
            facts = master.collect_stats()[1][0]
        finally:
            master.close(shutdown_workers=True)
        deadline = time.monotonic() + 30
        while worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        peak, kills = group.peak(), group.oom_kills()
    print(f"\nworker: shard {needs.total / MiB:.0f} MiB, budget {budget / MiB:.0f} MiB, cgroup "
          f"limit {limit / MiB:.0f} MiB, peak {peak and peak / MiB:.0f} MiB; window pins "
          f"{facts['window_pinned_blocks']} and streams {facts['window_streamed_blocks']} "
          f"blocks; tokens {result.token_ids}")
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert len(result.token_ids) == NEW_TOKENS and len(set(result.token_ids)) > 1
    assert facts["window_streamed_blocks"] > 0 and facts["window_bytes_read"] > 0
    assert kills in (0, -1)
    if peak is not None:
        assert peak <= limit


@pytest.mark.slow
def test_the_benchmark_runs_a_small_70b_end_to_end(cgroups_here, tmp_path):
    """``benchmarks/seventy_b.py`` on 4 of llama2-70b's 80 layers, eight namespaces (root)."""
    if os.geteuid() != 0:
        pytest.skip("the namespace testbed needs root")
    from helpers.paths import REPO

    done = processes.run([sys.executable, str(REPO / "benchmarks" / "seventy_b.py"),
                          "--layers", "4", "--prompt-tokens", "8", "--new-tokens", "2",
                          "--work", str(tmp_path / "work"), "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=900, env=child_env())
    assert done.returncode in (0, 3), done.stderr[-4000:]  # 3: a target missed, said so
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["generated_tokens"] == 2 and len(result["nodes"]) == 8
    for key in ("s_per_token", "ttft_s", "disk_bound_s_per_token", "planner_s_per_token"):
        assert 0 < result[key] < 600, (key, result[key])
    for node in result["nodes"]:
        assert node["peak_bytes"] and node["peak_bytes"] <= node["limit_bytes"]
        assert node["rank"] == 0 or node["bytes_read_per_token"] > 0  # the workers stream
    assert result["full_model"]["layers"] == 80 and result["tpi_llm"]["s_per_token"] == 26.1
    assert result["targets"]["completes"]["met"] and result["targets"]["peaks_under_limits"]["met"]
    assert not (tmp_path / "work").exists()  # the split is deleted unless --keep
