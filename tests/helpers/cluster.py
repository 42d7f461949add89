"""Running real local clusters (worker processes on loopback) in tests, without leaks or hangs.

* :func:`running_cluster` starts a :class:`~edgetp.runtime.local.LocalCluster` with its split, logs
  and cache under a test's temporary directory and a short timeout, and always stops it: the
  workers are told to shut down, and after ``stop()`` every worker process ever started by the
  cluster (restarts included) must have exited; a survivor is killed and fails the test.
  The workers belong to the scope that started the cluster (:mod:`helpers.processes`): a
  worker a test restarts in a module's cluster outlives the test.
* :func:`~helpers.deadline.call_with_deadline` runs a call in a thread and fails the test if it
  does not return in time, so a broken protocol shows up as a failure instead of a hung test.
* :class:`FakeMaster` is a bare ROUTER socket speaking the wire protocol, to drive a real
  worker process by hand (and to send it malformed frames).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from edgetp.net import wire
from edgetp.net.wire import Message, WireError
from edgetp.runtime.commands import WorkerCommand
from edgetp.runtime.local import LocalCluster
from helpers.deadline import call_with_deadline, wait_for
from helpers.processes import current_owner, spawn

TIMEOUT_S = 3.0  # the cluster's timeout (master and workers): failures must show within it
JOIN_TIMEOUT_S = 60.0  # worker processes import torch: allow for a loaded 2-core machine
STOP_TIMEOUT_S = 30.0

__all__ = ["call_with_deadline", "wait_for"]  # (re-exported: the cluster tests' deadlines)


class TrackedCluster(LocalCluster):
    """A LocalCluster that remembers every worker process it ever started."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.processes: list[tuple[int, subprocess.Popen[bytes]]] = []
        self.owner = current_owner()  # the scope that made the cluster owns its workers

    def start_worker(self, rank: int) -> None:
        super().start_worker(rank)
        proc = self.workers[rank]
        self.processes.append((rank, proc))
        if self.owner is not None:
            self.owner.adopt(proc.pid)

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


def worker_command(shard_dir: Path, master: str, timeout_s: float = TIMEOUT_S,
                   *extra: str) -> list[str]:
    return WorkerCommand(shard_dir, master, timeout_s).argv(sys.executable) + list(extra)


def start_worker_process(shard_dir: Path, master: str, log_path: Path,
                         timeout_s: float = TIMEOUT_S) -> subprocess.Popen[bytes]:
    """A worker process outside any LocalCluster (output to ``log_path``), in its own process
    group: the caller waits for it, and the test's end kills it if it is still running."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log_path.open("ab") as log:
        return spawn(worker_command(shard_dir, master, timeout_s), env=env,
                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


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


def is_wire_error(frames: list[bytes]) -> bool:
    try:
        wire.decode(frames)
    except WireError:
        return True
    return False
