"""Running real local clusters (worker processes on loopback) in tests, without leaks or hangs.

* :func:`running_cluster` starts a :class:`~edgetp.runtime.local.LocalCluster` with its split, logs
  and cache under a test's temporary directory and a short timeout, and always stops it: the
  workers are told to shut down, and after ``stop()`` every worker process ever started by the
  cluster (restarts included) must have exited; a survivor is killed and fails the test.
* :func:`call_with_deadline` runs a call in a thread and fails the test if it does not return
  in time, so a broken protocol shows up as a failure instead of a hung test run.
* :class:`Watchdog` is the last resort against a hang anywhere in a test: it dumps every
  thread's stack, kills the tracked worker processes and exits the test process.
* :class:`FakeMaster` is a bare ROUTER socket speaking the wire protocol, to drive a real
  worker process by hand (and to send it malformed frames).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq

from edgetp.net import wire
from edgetp.net.wire import Message, WireError
from edgetp.runtime.commands import WorkerCommand
from edgetp.runtime.local import LocalCluster

T = TypeVar("T")

TIMEOUT_S = 3.0  # the cluster's timeout (master and workers): failures must show within it
JOIN_TIMEOUT_S = 60.0  # worker processes import torch: allow for a loaded 2-core machine
STOP_TIMEOUT_S = 30.0

_ALL_PROCESSES: list[subprocess.Popen[Any]] = []  # every process started here (for the watchdog)


class TrackedCluster(LocalCluster):
    """A LocalCluster that remembers every worker process it ever started."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.processes: list[tuple[int, subprocess.Popen[bytes]]] = []

    def start_worker(self, rank: int) -> None:
        super().start_worker(rank)
        proc = self.workers[rank]
        self.processes.append((rank, proc))
        _ALL_PROCESSES.append(proc)

    @property
    def transport(self) -> Any:
        assert self.master is not None, "the cluster is not running"
        return self.master.runner.transport  # type: ignore[attr-defined]

    def logs(self) -> str:
        out = []
        for path in sorted((self.split_dir / "logs").glob("rank-*.log")):
            out.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)


@contextlib.contextmanager
def running_cluster(model_dir: str | Path, n_nodes: int, root: Path,
                    timeout_s: float = TIMEOUT_S, **kwargs: Any) -> Iterator[TrackedCluster]:
    """A started cluster (split into ``root/split``, cache in ``root/cache``); stopped on exit."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGETP_CACHE", str(root / "cache"))
        mp.setenv("OMP_NUM_THREADS", "1")
        cluster = TrackedCluster(model_dir, n_nodes, timeout_s=timeout_s,
                                 split_dir=root / "split", **kwargs)
        try:
            call_with_deadline(cluster.start, JOIN_TIMEOUT_S + 30, "starting the cluster")
            yield cluster
        except BaseException:
            sys.stderr.write(cluster.logs())
            raise
        finally:
            stop_cluster(cluster)


def stop_cluster(cluster: TrackedCluster) -> dict[int, int | None]:
    """Stop the cluster; assert every worker process it ever started has exited.

    Returns the exit status of the last process of each rank.
    """
    try:
        call_with_deadline(cluster.stop, STOP_TIMEOUT_S, "stopping the cluster")
    finally:
        survivors = []
        for rank, proc in cluster.processes:
            if proc.poll() is None:
                survivors.append((rank, proc.pid))
                proc.kill()
                proc.wait(timeout=10)
    assert not survivors, f"worker processes still running after stop(): {survivors}"
    return {rank: proc.returncode for rank, proc in cluster.processes}


def call_with_deadline(fn: Callable[[], T], timeout_s: float, what: str = "the call") -> T:
    """``fn()``, run in a thread; raises AssertionError if it has not returned in time."""
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result["error"] = exc

    thread = threading.Thread(target=body, daemon=True, name=f"deadline: {what}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        faulthandler.dump_traceback(file=sys.stderr)
        raise AssertionError(f"{what} did not finish within {timeout_s:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


class Watchdog:
    """Kill the worker processes and exit if the guarded block outlives ``timeout_s``."""

    def __init__(self, timeout_s: float, what: str = "test") -> None:
        self.timeout_s = timeout_s
        self.what = what
        self._timer = threading.Timer(timeout_s, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        sys.stderr.write(f"\nWATCHDOG: {self.what} hung for {self.timeout_s:g} s; stacks:\n")
        faulthandler.dump_traceback(file=sys.stderr)
        for proc in _ALL_PROCESSES:
            with contextlib.suppress(Exception):
                proc.kill()
        os._exit(3)

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.02)


def worker_command(shard_dir: Path, master: str, timeout_s: float = TIMEOUT_S,
                   *extra: str) -> list[str]:
    return WorkerCommand(shard_dir, master, timeout_s).argv(sys.executable) + list(extra)


def start_worker_process(shard_dir: Path, master: str, log_path: Path,
                         timeout_s: float = TIMEOUT_S) -> subprocess.Popen[bytes]:
    """A worker process outside any LocalCluster (output to ``log_path``); the caller waits."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(worker_command(shard_dir, master, timeout_s), env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    _ALL_PROCESSES.append(proc)
    return proc


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """Kill ``proc`` on exit from the block if it is still running."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


class FakeMaster:
    """A ROUTER socket on a free loopback port that speaks the wire protocol by hand."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.identity: bytes | None = None
        self.hellos = 0

    def recv_raw(self, timeout_s: float) -> list[bytes] | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return self.sock.recv_multipart()

    def recv(self, timeout_s: float, ops: tuple[str, ...] = ()) -> tuple[bytes, Message]:
        """The next valid message (of one of ``ops``, if given) from the worker.

        Pings are answered with pongs, and a hello (the worker reconnecting) is welcomed again,
        so the worker never has a reason to give up on this master while a test talks to it.
        """
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            frames = self.recv_raw(remaining)
            if frames is None:
                break
            identity, body = frames[0], frames[1:]
            message = wire.decode(body)  # the worker must only ever send valid messages
            if message.op == "ping":
                self.send(identity, "pong", {"time": time.time(),
                                             "echo": message.fields["time"]})
            elif message.op == "hello" and "hello" not in ops:
                self.welcome(identity)
            if not ops or message.op in ops:
                return identity, message
        raise AssertionError(f"no {ops or 'message'} from the worker within {timeout_s:g} s")

    def welcome(self, identity: bytes) -> None:
        """A valid welcome for the star allreduce, whatever fields the schema has grown."""
        self.identity = identity
        self.hellos += 1
        known = {"session": "fake", "wire_dtype": "f32", "time": time.time(), "allreduce": "star"}
        fields = {name: known.get(name, kind()) for name, kind in wire.SCHEMAS["welcome"].items()}
        self.send(identity, "welcome", fields)

    def send(self, identity: bytes, op: str, fields: dict[str, Any],
             tensors: Any = ()) -> None:
        self.send_raw(identity, wire.encode(op, fields, tensors))

    def send_raw(self, identity: bytes, frames: list[Any]) -> None:
        self.sock.send_multipart([identity, *frames], copy=False)

    def close(self) -> None:
        self.sock.close(linger=0)


def ring_sums(inputs: list[Any], wire_dtype: str = "f32") -> dict[int, Any]:
    """Rank -> the sum of ``inputs`` (one tensor per rank) by ring links of one process,
    each rank in a thread, with the allreduce's first index of a two-allreduce step."""
    from edgetp.net.collectives import StepPosition
    from edgetp.net.ring import RingAllreduce, RingLink, successor_addresses

    n = len(inputs)
    links = [RingLink("127.0.0.1") for _ in range(n)]
    addresses = {r: f"tcp://127.0.0.1:{links[r].port}" for r in range(n)}
    for rank, address in successor_addresses(addresses, n).items():
        links[rank].connect(address or addresses[0])
    outputs: dict[int, Any] = {}

    def run(rank: int) -> None:
        position = StepPosition()
        position.begin(1, 1, 2)
        comm = RingAllreduce(rank, n, links[rank], position, wire_dtype, timeout_s=5.0)
        outputs[rank] = comm.allreduce(inputs[rank])

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    for link in links:
        link.close()
    return outputs


def is_wire_error(frames: list[bytes]) -> bool:
    try:
        wire.decode(frames)
    except WireError:
        return True
    return False
