"""``edgetp serve`` starting and stopping, as a real process.

* A port that is taken is said at once, in one line that names it and how to pick another,
  before any model is loaded or split; ``--port`` out of 1-65535 is a usage error.
* After SIGTERM, ``serve --nodes 2`` exits within a few seconds, idle or in the middle of a
  request (even one whose worker is stuck in a step), and leaves no worker behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import processes
from helpers.cluster import JOIN_TIMEOUT_S
from helpers.serving import spawn_server

from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt

START_DEADLINE_S = JOIN_TIMEOUT_S + 60
EXIT_DEADLINE_S = 10.0  # after SIGTERM, the server and its workers are gone within this


def environment(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "EDGETP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def serve_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgetp.cli", "serve", str(DEMO_MODEL_DIR), *args]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_taken_port_is_said_at_once_before_the_model_loads(tmp_path: Path,
                                                              taken_port: int) -> None:
    started = time.monotonic()
    proc = processes.run(serve_argv("--nodes", "2", "--port", str(taken_port)), timeout=120,
                         capture_output=True, text=True, env=environment(tmp_path))
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: port {taken_port} on 127.0.0.1 is taken (another `edgetp serve` "
                      f"or another server); stop it, or pick a free port with --port N (e.g. "
                      f"--port {taken_port + 1})"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache" / "splits").exists(), "the model was split before the bind"
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("port", ["80000", "0", "-1"])
def test_a_port_out_of_range_is_a_usage_error(tmp_path: Path, port: str) -> None:
    proc = processes.run(serve_argv("--port", port), timeout=120, capture_output=True,
                         text=True, env=environment(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert "Invalid value for '--port'" in proc.stderr and "1<=x<=65535" in proc.stderr
    assert "Traceback" not in proc.stderr


def start_server(tmp_path: Path) -> tuple[subprocess.Popen[str], str, list[int]]:
    """``serve --nodes 2`` on a free port: the process, its URL, its worker pids."""
    proc, url = spawn_server([str(DEMO_MODEL_DIR), "--nodes", "2", "--max-new-tokens", "200"],
                             environment(tmp_path), START_DEADLINE_S)
    workers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)
               if "worker" in p.cmdline()]
    assert len(workers) == 1
    return proc, url, workers


def assert_exits_on_sigterm(proc: subprocess.Popen[str], workers: list[int]) -> None:
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        proc.wait(EXIT_DEADLINE_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve was still running {EXIT_DEADLINE_S:g} s after SIGTERM")
    left = [pid for pid in workers if processes.alive(pid)]
    assert not left, f"workers {left} outlived serve"
    assert time.monotonic() - started < EXIT_DEADLINE_S


def test_sigterm_stops_an_idle_server_and_its_workers(tmp_path: Path) -> None:
    proc, _, workers = start_server(tmp_path)
    assert_exits_on_sigterm(proc, workers)


@pytest.mark.parametrize("worker_state", ["running",
                                          pytest.param("stuck", marks=pytest.mark.slow)])
def test_sigterm_stops_a_server_in_the_middle_of_a_request(tmp_path: Path,
                                                           worker_state: str) -> None:
    """Also when the worker is stuck in the step (stopped here by SIGSTOP): the step would
    only fail at --timeout (10 s), and the master must not wait for it."""
    proc, url, workers = start_server(tmp_path)
    body = json.dumps({"model": "demo_model", "prompt": demo_prompt(1, 1), "max_tokens": 200,
                       "stream": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.readline()  # the stream has begun: a generation runs
        if worker_state == "stuck":
            os.kill(workers[0], signal.SIGSTOP)
            time.sleep(0.5)
        assert_exits_on_sigterm(proc, workers)
