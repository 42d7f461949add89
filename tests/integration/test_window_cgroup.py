"""The memory budget holds under a REAL memory limit: a cgroup the kernel enforces.

A float32 Llama (hidden 1024, MLP 8192, 12 layers, vocab 8000: a 1.4 GB checkpoint) is split
over 2 nodes, so each rank's shard is 640-700 MB. The master (rank 0, a small driver script
around :meth:`~edgetp.runtime.master.Master.cluster`) and the worker (``edgetp worker``,
rank 1) run as separate processes, each inside its own memory cgroup (cgroup v1
``memory.limit_in_bytes`` or v2 ``memory.max``, no swap) whose limit is

    limit = baseline (a python + torch + edgetp process's peak RSS, measured here: ~290 MB)
            + the node's ``--memory-budget`` (its minimum plus 32 MiB)
            + 64 MiB of slack (allocator, activations, sockets)

which is clearly less than baseline + shard and, asserted, less than the shard size itself.
Each process enters its cgroup before it starts (``sh`` writes its own pid into
``cgroup.procs``, then ``exec``s python), so nothing it allocates escapes the limit. There is
no swap: anonymous memory over the limit cannot be reclaimed, so the kernel's OOM killer would
kill a node that held its whole shard; :func:`test_without_a_budget_the_limit_kills_the_worker`
shows that it does. With the budget, the run completes and its greedy tokens and logits are
identical to an unlimited run's; the cgroups' peak charge (``memory.max_usage_in_bytes`` /
``memory.peak``) stayed within the limit, nobody was OOM-killed, and each process's peak RSS
minus the baseline stayed below its shard size (it never held the shard).

Skipped, with the reason, where no writable memory cgroup hierarchy exists (not root, or no
memory controller). Slow (a minute or two): run with ``-m slow``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import processes
from helpers.cgroup import CgroupUnavailable, MemoryCgroup, cgroup_support, memory_cgroup

from edgetp.model.synthetic import llama_config, write_model
from edgetp.parallel.loader import shard_memory_needs
from edgetp.runtime.local import free_port
from edgetp.shard.split import split_checkpoint

pytestmark = pytest.mark.slow

MiB = 1 << 20
CONFIG = llama_config(hidden=1024, intermediate=8192, layers=12, heads=16, kv_heads=4,
                      vocab=8000)
MAX_SEQ_LEN = 64
PROMPT = [1, 734, 2981, 77, 5120, 4410, 19, 7777]
DECODE_STEPS = 4
EXTRA_BUDGET = 32 * MiB  # above each node's minimum: a few blocks pinned, most streamed
SLACK = 64 * MiB
TIMEOUT_S = 120.0  # cluster timeout: streaming under memory pressure is slow, not stuck
RUN_DEADLINE_S = 300.0
OOM_DEADLINE_S = 120.0

BASELINE_SCRIPT = r"""
import torch, zmq
import edgetp.cli.main, edgetp.parallel.loader, edgetp.runtime.master, edgetp.runtime.worker
torch.randn(256, 256) @ torch.randn(256, 256)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) * 1024)
"""

# Rank 0: load the shard (with a budget unless 0), wait for the worker, greedy-decode from
# PROMPT by calling the cluster runner (token ids in, logits out: no tokenizer involved), write
# the result, then wait for the test to read the worker's figures before shutting it down.
MASTER_SCRIPT = r"""
import json, os, sys, time
from pathlib import Path
import torch
from edgetp.runtime.master import Master

shard, address, budget, out, release, prompt, steps, max_seq_len, timeout = sys.argv[1:10]
master = Master.cluster(shard, address, "float32", int(max_seq_len), "f32", float(timeout),
                        memory_budget=int(budget) or None)
try:
    runner = master.runner
    runner.reset()
    tokens = json.loads(prompt)
    logits = runner.logits(torch.tensor(tokens), 0)
    position, generated, tops = len(tokens), [], []
    for _ in range(int(steps)):
        token = int(logits.argmax())
        generated.append(token)
        tops.append(logits.max().item())
        logits = runner.logits(torch.tensor([token]), position)
        position += 1
    window = runner.model.window
    peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status")
            if l.startswith("VmHWM:")][0]
    # Written whole, then renamed: the test polls for the file, and a process at its cgroup's
    # limit can stall between creating a file and writing it (the test once read it empty).
    Path(out + ".part").write_text(json.dumps({
        "tokens": generated, "tops": tops, "peak_rss": peak,
        "streamed": 0 if window is None else len(window.streamed),
        "pinned": 0 if window is None else len(window.pinned),
    }))
    os.replace(out + ".part", out)
    deadline = time.monotonic() + 120
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
finally:
    master.close(shutdown_workers=True)
"""


@pytest.fixture(scope="module")
def cgroups_here() -> tuple[int, Path]:
    try:
        return cgroup_support()
    except CgroupUnavailable as exc:
        pytest.skip(f"no usable memory cgroup: {exc}")


@pytest.fixture(scope="module")
def big_split(cgroups_here, tmp_path_factory):
    """The 2-node split of the big model (rank directories); deleted after the module."""
    root = tmp_path_factory.mktemp("cgroup_model")
    try:
        model_dir = write_model(root / "model", CONFIG)  # with the tokenizer Master.cluster needs
        dirs = split_checkpoint(model_dir, root / "split", 2).rank_dirs
        (model_dir / "model.safetensors").unlink()
        yield dirs
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def baseline_rss() -> int:
    """Peak RSS of a process that imported torch and edgetp and multiplied two matrices."""
    proc = processes.run([sys.executable, "-c", BASELINE_SCRIPT], capture_output=True,
                         text=True, timeout=120, check=True, env=child_env())
    return int(proc.stdout.strip().splitlines()[-1])


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "EDGETP_LOG": "WARNING"}


def shard_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def peak_rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def budgets_and_limits(dirs: list[Path], baseline: int) -> tuple[list[int], list[int]]:
    budgets, limits = [], []
    for d in dirs:
        needs = shard_memory_needs(d, max_seq_len=MAX_SEQ_LEN)
        budget = needs.minimum() + EXTRA_BUDGET
        assert budget < needs.total, "the budget must force streaming"
        budgets.append(budget)
        limits.append(baseline + budget + SLACK)
    return budgets, limits


# -- running the two nodes --------------------------------------------------------------------


class NodeFailed(AssertionError):
    pass


def run_two_nodes(dirs: list[Path], work: Path, budgets: list[int] | None,
                  limits: list[int] | None) -> dict:
    """Run rank 0 (driver script) and rank 1 (``edgetp worker``), each in its own cgroup when
    ``limits`` is given; returns the master's result plus each node's figures."""
    work.mkdir(parents=True, exist_ok=True)
    out, release = work / "result.json", work / "release"
    address = f"tcp://127.0.0.1:{free_port()}"
    budget0, budget1 = budgets if budgets else (0, None)
    commands = [
        [sys.executable, "-c", MASTER_SCRIPT, str(dirs[0]), address, str(budget0), str(out),
         str(release), json.dumps(PROMPT), str(DECODE_STEPS), str(MAX_SEQ_LEN), str(TIMEOUT_S)],
        [sys.executable, "-m", "edgetp.cli", "worker", "--shard", str(dirs[1]), "--master",
         address, "--timeout", str(TIMEOUT_S), "--max-seq-len", str(MAX_SEQ_LEN)]
        + ([] if budget1 is None else ["--memory-budget", str(budget1)]),
    ]
    started: list[int] = []
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        groups: list[MemoryCgroup | None] = [None, None]
        if limits:
            groups = [stack.enter_context(memory_cgroup(f"rank{r}", limits[r], started))
                      for r in range(2)]
        try:
            for rank, command in enumerate(commands):
                group = groups[rank]
                log = (work / f"rank-{rank}.log").open("wb")
                stack.callback(log.close)
                procs.append(processes.spawn(group.wrap(command) if group else command,
                                             stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=child_env()))
                started.append(procs[-1].pid)
            for group, proc in zip(groups, procs, strict=True):
                if group is not None:
                    wait_for(lambda g=group, p=proc: p.pid in g.pids(), procs, work,
                             "the process to enter its cgroup", 10.0)
            wait_for(out.exists, procs, work, "the generation", RUN_DEADLINE_S)
            result = json.loads(out.read_text())
            result["worker_peak_rss"] = peak_rss_of(procs[1].pid)
            release.touch()
            for proc in procs:
                proc.wait(timeout=60)
            result["returncodes"] = [p.returncode for p in procs]
            result["cgroups"] = [None if g is None else {
                "limit": g.limit, "peak": g.peak(), "oom_kills": g.oom_kills()}
                for g in groups]
            return result
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)


def wait_for(condition, procs: list[subprocess.Popen[bytes]], work: Path, what: str,
             timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        for rank, proc in enumerate(procs):
            if proc.poll() is not None:
                raise NodeFailed(f"rank {rank} exited with status {proc.returncode} while "
                                 f"waiting for {what}{describe_exit(proc.returncode)}\n"
                                 + logs(work))
        if time.monotonic() > deadline:
            raise NodeFailed(f"timed out after {timeout_s:g} s waiting for {what}\n" + logs(work))
        time.sleep(0.05)


def describe_exit(code: int | None) -> str:
    return " (SIGKILL: the OOM killer?)" if code == -signal.SIGKILL else ""


def logs(work: Path) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(work.glob("rank-*.log")))


# -- the tests ---------------------------------------------------------------------------------


def test_budgeted_nodes_run_under_a_memory_limit_below_their_shard(big_split, baseline_rss,
                                                                   tmp_path):
    dirs = big_split
    shards = [shard_bytes(d) for d in dirs]
    budgets, limits = budgets_and_limits(dirs, baseline_rss)
    print(f"\nbaseline RSS {baseline_rss / MiB:.0f} MiB; shards "
          f"{[round(s / MiB) for s in shards]} MiB; budgets {[round(b / MiB) for b in budgets]}"
          f" MiB; cgroup limits {[round(lim / MiB) for lim in limits]} MiB")
    for rank in range(2):
        assert limits[rank] < shards[rank], (
            f"rank {rank}: the limit ({limits[rank] / MiB:.0f} MiB) must be below the shard "
            f"({shards[rank] / MiB:.0f} MiB) for the test to mean anything")

    want = run_two_nodes(dirs, tmp_path / "unlimited", None, None)
    assert want["streamed"] == 0 and want["returncodes"] == [0, 0]
    got = run_two_nodes(dirs, tmp_path / "limited", budgets, limits)

    assert got["returncodes"] == [0, 0]
    assert got["tokens"] == want["tokens"]
    assert got["tops"] == want["tops"]  # bit-identical logits
    assert got["streamed"] > 0
    peaks = [got["peak_rss"], got["worker_peak_rss"]]
    for rank, group in enumerate(got["cgroups"]):
        charged = group["peak"]
        print(f"rank {rank}: limit {group['limit'] / MiB:.0f} MiB, cgroup peak "
              f"{'n/a' if charged is None else f'{charged / MiB:.0f} MiB'}, peak RSS "
              f"{peaks[rank] / MiB:.0f} MiB (unlimited run: "
              f"{(want['peak_rss'], want['worker_peak_rss'])[rank] / MiB:.0f} MiB), "
              f"OOM kills {group['oom_kills']}")
        assert group["oom_kills"] in (0, -1)
        if charged is not None:
            assert charged <= group["limit"]
        assert peaks[rank] - baseline_rss < shards[rank], (
            f"rank {rank} held {peaks[rank] - baseline_rss} bytes over the baseline: as much as "
            "its shard")


def test_without_a_budget_the_limit_kills_the_worker(big_split, baseline_rss, tmp_path):
    """The negative control: the same limit, no --memory-budget: the OOM killer steps in, or
    (when the loaded weights stay file-backed) the kernel holds the cgroup at its limit."""
    dirs = big_split
    _, limits = budgets_and_limits(dirs, baseline_rss)
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody listens: loading comes first
    command = [sys.executable, "-m", "edgetp.cli", "worker", "--shard", str(dirs[1]),
               "--master", address, "--timeout", "5", "--max-seq-len", str(MAX_SEQ_LEN)]
    started: list[int] = []
    with memory_cgroup("no-budget", limits[1], started) as group:
        log = (tmp_path / "worker.log").open("wb")
        with log:
            proc = processes.spawn(group.wrap(command), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=child_env())
            started.append(proc.pid)
            try:
                proc.wait(timeout=OOM_DEADLINE_S)
            except subprocess.TimeoutExpired:
                # Weights that stay file-backed (safetensors memory maps them) are page cache
                # the kernel can reclaim, so the worker may survive by re-reading instead of
                # being killed. The limit is still enforced if the cgroup was held at it.
                peak = group.peak()
                proc.kill()
                proc.wait()
                if peak is None or peak < 0.95 * limits[1]:
                    pytest.fail("the worker without a budget neither died nor reached its "
                                f"limit (peak {peak}, limit {limits[1]}): the limit is not "
                                "enforced, so the budgeted run proves nothing\n"
                                + (tmp_path / "worker.log").read_text(errors="replace")[-3000:])
                return
        kills = group.oom_kills()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "worker.log").read_text()[-3000:]
    assert kills in (1, -1), kills
