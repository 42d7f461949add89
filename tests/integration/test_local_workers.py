"""The processes of a local cluster, and a worker on its own (real processes).

* A local cluster's workers die with their master: ``edgetp serve --nodes 3`` killed by
  SIGKILL leaves no worker a few seconds later; so does a master whose cluster was started by
  a thread that has ended since (Linux signals a child when the *thread* that forked it ends),
  and a worker told to follow a process that is not its parent exits at once.
* A folder named ``edgetp`` in the working directory (a clone of the repository) does not
  shadow the installed package in the workers: ``generate --nodes 2`` run from there works.
* A worker started before its master says where it waits, and says it again every few seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner
from helpers import processes
from helpers.cluster import JOIN_TIMEOUT_S, worker_command

from edgetp.cli.main import main
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.runtime.lifeline import ParentWatch
from edgetp.runtime.local import free_port
from edgetp.runtime.worker import WAITING_REPORT_S
from edgetp.shard.split import split_checkpoint

ORPHAN_DEADLINE_S = 5.0  # a worker outliving its master by more than this is an orphan
START_DEADLINE_S = JOIN_TIMEOUT_S + 60  # the master loads, splits, starts and joins workers


def environment(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "EDGETP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout_s: float) -> str:
    """The first line of ``proc``'s standard output matching ``pattern``."""
    found: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if re.search(pattern, line):
                found.append(line)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    assert found, f"no line matching {pattern!r} within {timeout_s:g} s (status {proc.poll()})"
    return found[0]


def worker_pids(master_pid: int) -> list[int]:
    """The ``edgetp worker`` processes below ``master_pid``."""
    children = psutil.Process(master_pid).children(recursive=True)
    return [p.pid for p in children if "worker" in p.cmdline()]


def assert_die_with(master: subprocess.Popen[str], workers: list[int]) -> None:
    """SIGKILL ``master``; every one of ``workers`` must be gone within the deadline."""
    assert workers and all(processes.alive(pid) for pid in workers)
    master.send_signal(signal.SIGKILL)
    master.wait(10)
    deadline = time.monotonic() + ORPHAN_DEADLINE_S
    while (left := [pid for pid in workers if processes.alive(pid)]) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"workers {left} outlived their master by {ORPHAN_DEADLINE_S:g} s"


# -- workers die with their master ---------------------------------------------------------------


def test_serve_workers_die_with_a_killed_master(tmp_path: Path) -> None:
    port = free_port()
    master = processes.spawn(
        [sys.executable, "-m", "edgetp.cli", "serve", str(DEMO_MODEL_DIR), "--nodes", "3",
         "--port", str(port), "--json"], env=environment(tmp_path), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    wait_for_line(master, r'"url"', START_DEADLINE_S)
    workers = worker_pids(master.pid)
    assert len(workers) == 2
    assert_die_with(master, workers)


# A master whose cluster is started by a thread that ends before the master is killed.
THREAD_STARTED_MASTER = r"""
import sys, threading, time
from edgetp.runtime.local import LocalCluster

cluster = LocalCluster(sys.argv[1], 2)
starter = threading.Thread(target=cluster.start)
starter.start()
starter.join()
time.sleep(1.0)  # the starting thread is gone: its workers must live on
print("workers", *[p.pid for p in cluster.workers.values()],
      *[p.poll() for p in cluster.workers.values()], flush=True)
time.sleep(600)
"""


def test_workers_outlive_the_thread_that_started_them_not_the_master(tmp_path: Path) -> None:
    master = processes.spawn([sys.executable, "-c", THREAD_STARTED_MASTER, str(DEMO_MODEL_DIR)],
                             env=environment(tmp_path), text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    line = wait_for_line(master, r"^workers ", START_DEADLINE_S)
    _, pid, status = line.split()
    assert status == "None", "the worker died with the thread that started it"
    assert_die_with(master, [int(pid)])


def test_a_worker_whose_parent_is_not_the_one_named_exits(tmp_path: Path) -> None:
    """Its master died before the worker asked to follow it: the worker exits at once."""
    [_, rank1] = split_checkpoint(DEMO_MODEL_DIR, tmp_path / "split", 2).rank_dirs
    stranger = os.getppid()  # alive, but not the worker's parent
    proc = processes.run([*worker_command(rank1, f"tcp://127.0.0.1:{free_port()}"),
                          "--parent-pid", str(stranger)], timeout=60, capture_output=True,
                         text=True, env=environment(tmp_path))
    assert proc.returncode != 0
    assert f"the master (pid {stranger}) is gone" in proc.stderr


def test_parent_watch_notices_a_new_parent() -> None:
    """The fallback where there is no parent-death signal: the parent's pid is watched."""
    parent = {"pid": 100}
    gone: list[int] = []
    watch = ParentWatch(100, gone.append, interval_s=0.01, getppid=lambda: parent["pid"])
    watch.start()
    try:
        time.sleep(0.1)
        assert gone == []
        parent["pid"] = 1  # reparented: the parent died
        deadline = time.monotonic() + 5
        while not gone and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gone == [100]
    finally:
        watch.stop()


# -- the working directory never shadows edgetp --------------------------------------------------


def test_generate_from_a_directory_holding_a_folder_named_edgetp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clone = tmp_path / "clone"
    (clone / "edgetp").mkdir(parents=True)
    (clone / "edgetp" / "__init__.py").write_text(
        "raise ImportError('the edgetp folder of the working directory was imported')\n")
    monkeypatch.chdir(clone)
    result = CliRunner().invoke(
        main, ["generate", str(DEMO_MODEL_DIR), "--prompt", demo_prompt(4, 1), "--nodes", "2",
               "--max-new-tokens", "64", "--json"],
        env={"EDGETP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["text"].strip() == expected_text(4, 1)


# -- a worker waiting for its master -------------------------------------------------------------


@pytest.mark.slow  # two waiting reports are 10 s apart: CI runs it with the slow tests
def test_a_worker_without_its_master_says_where_it_waits(tmp_path: Path) -> None:
    [_, rank1] = split_checkpoint(DEMO_MODEL_DIR, tmp_path / "split", 2).rank_dirs
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = processes.spawn(worker_command(rank1, address), env=environment(tmp_path),
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    pattern = re.compile(rf"waiting for the master at {re.escape(address)}")
    seen: list[float] = []  # when each report appeared
    deadline = time.monotonic() + JOIN_TIMEOUT_S + 3 * WAITING_REPORT_S
    try:
        while len(seen) < 2 and time.monotonic() < deadline and worker.poll() is None:
            count = len(pattern.findall(log_path.read_text(errors="replace")))
            seen += [time.monotonic()] * (count - len(seen))
            time.sleep(0.05)
        text = log_path.read_text(errors="replace")
        assert len(seen) >= 2, f"fewer than two waiting reports:\n{text[-3000:]}"
        assert f"joining the master at {address}" in text
        assert seen[1] - seen[0] < 2 * WAITING_REPORT_S, text[-3000:]
    finally:
        worker.terminate()
        worker.wait(10)
