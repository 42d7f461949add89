"""Star allreduce latency of the real edgetp transport, against a raw ZeroMQ ping-pong floor.

Run::

    .venv/bin/python benchmarks/allreduce.py [--sizes 1K,4K,...] [--nodes 2,4,8] [--repeat R]
                                             [--budget S] [--quick] [--secure] [--json]

For each message size (float32 tensors of shape ``[1, size/4]``) and each cluster size N:

* **allreduce**: this process is rank 0 (:class:`~edgetp.net.transport.MasterTransport` +
  :class:`~edgetp.net.collectives.StarMaster`, ROUTER bound on ``tcp://127.0.0.1:<free port>``);
  N-1 worker processes (multiprocessing ``spawn``) each run
  :class:`~edgetp.net.transport.WorkerTransport` +
   :class:`~edgetp.net.collectives.StarWorker`, after
  the real handshake with a fake fingerprint and plan that both sides agree on. Rounds are
  driven like the real master drives them: the master broadcasts a ``step`` message carrying a
  tensor of the benchmark shape, whose ``start`` field holds the number of allreduces in the
  step; every rank then runs that many allreduces on a tensor of that shape. The first
  allreduce of a step (it includes the step broadcast) and the last one (a reduce-only, as in
  the model) are not timed; each one in between is timed on the master, which in steady state
  is the full cycle worker partial -> master gather + sum -> sum broadcast -> worker.
* **ping-pong**: the floor. One child process echoes the same payload over a raw ZeroMQ
  ROUTER/DEALER pair on tcp loopback (``send_multipart(copy=False)``, no header, no decoding);
  the median round trip is reported.
* **ratio**: allreduce median / ping-pong median.
* **with keys** (``--secure``): a second cluster of N ranks with CURVE keys (made in a
  temporary directory), whose allreduce goes over the sealed data link
  (edgetp.net.sealedlink); both clusters run side by side and each size is measured in
  :data:`SECURE_ROUNDS` alternating rounds, so load that comes and goes hits both alike. The
  column is its median and the difference from the plain one; the verdict checks the target
  (at most :data:`SECURE_TARGET_US` more at 8 KiB), and the cipher's own cost per KiB
  (``benchmarks/cipher_cost.py``) is printed beside it.

Small messages (<= 16 KiB) get a verdict line per N: is the star allreduce under 1.5x the
ping-pong, and if not by how much.

Caveat: every rank is a process on this one machine. With N processes on 2 CPU cores the
workers compete for CPU, so the figures for N greater than the core count (N=4 and N=8 on a
2-core machine) include scheduling delay, not only transport cost. The output says so.

Workers are told to ``shutdown`` at the end; any child still alive (Ctrl-C, error) is
terminated in a ``finally``, and a worker whose parent disappears exits on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from edgetp.net import datalink as dataplane

# The repository's own edgetp first: spawned children inherit sys.path, and this venv's editable
# install (made before edgetp/__init__.py existed) imports edgetp as a namespace package from
# any other directory, where ``from edgetp import __version__`` in the handshake fails.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# torch and edgetp are imported lazily so the ping-pong child stays a light process.

DEFAULT_SIZES = "1K,4K,16K,64K,256K,1M,4M"
DEFAULT_NODES = "2,4,8"
QUICK_SIZES = "1K,64K"
QUICK_NODES = "2,4"
SMALL_BYTES = 16 * 1024  # the verdict covers sizes up to this
TARGET_RATIO = 1.5
FINGERPRINT = "benchmark-allreduce-fingerprint"
PLAN = '{"benchmark":"allreduce"}'
DTYPE = "float32"
STEP_CHUNK = 100  # timed allreduces per step message at most
MIN_SAMPLES = 10  # even past the time budget
WARMUP_S = 0.2  # per configuration, before timing
JOIN_TIMEOUT_S = 120.0  # spawning workers imports torch: slow with 7 of them on 2 cores
TIMEOUT_S = 15.0  # a worker whose master went silent this long exits
SECURE_ROUNDS = 4  # --secure: alternating rounds of the plain and the keyed cluster per size
SECURE_TARGET_US = 30.0  # --secure: what keys may add to an allreduce at 8 KiB
SECURE_TARGET_BYTES = 8 * 1024


# -- helpers ------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1
    if text.endswith("K"):
        scale, text = 1024, text[:-1]
    elif text.endswith("M"):
        scale, text = 1024 * 1024, text[:-1]
    size = int(float(text) * scale)
    if size <= 0 or size % 4:
        raise argparse.ArgumentTypeError(f"size {size} B is not a positive multiple of 4")
    return size


def format_size(size: int) -> str:
    if size % (1024 * 1024) == 0:
        return f"{size // (1024 * 1024)}M"
    if size % 1024 == 0:
        return f"{size // 1024}K"
    return f"{size}B"


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(samples_s: list[float]) -> dict[str, float]:
    us = [s * 1e6 for s in samples_s]
    return {"median": statistics.median(us), "p90": percentile(us, 90), "min": min(us),
            "n": len(us)}


def identity(rank: int):  # -> NodeIdentity
    from edgetp.net.transport import NodeIdentity

    return NodeIdentity(rank, FINGERPRINT, PLAN, DTYPE)


@contextlib.contextmanager
def signals_blocked():
    """Threads started inside never take the SIGINT/SIGTERM meant for the main thread.

    Python runs signal handlers in the main thread only; a signal the kernel hands to another
    thread (edgetp's heartbeat thread, torch's or pyzmq's helpers) does not interrupt the main
    thread's blocking zmq poll, so Ctrl-C would wait for the poll's timeout.
    """
    mask = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parent_gone(parent_pid: int) -> bool:
    return os.getppid() != parent_pid


# -- child processes ----------------------------------------------------------------------------


def star_worker(address: str, rank: int, n_ranks: int, keys: tuple[str, str] | None,
                parent_pid: int) -> None:
    """Rank ``rank``: join the master, run the allreduces of every step until ``shutdown``.
    ``keys``: its secret key file and the master's public key file (None: no keys)."""
    try:
        import torch

        torch.set_num_threads(1)
        from edgetp.net.collectives import StarWorker
        from edgetp.net.security import KeyPair, WorkerSecurity
        from edgetp.net.transport import (
            ClusterError,
            HandshakeRefused,
            ShutdownRequested,
            WorkerTransport,
        )

        security = None if keys is None else WorkerSecurity(KeyPair.load(keys[0]),
                                                            KeyPair.load(keys[1]).public)
        transport = WorkerTransport(address, identity(rank), timeout_s=TIMEOUT_S,
                                    security=security)
        comm = StarWorker(transport, rank, n_ranks, timeout_s=TIMEOUT_S)
        try:
            joined_by = time.monotonic() + JOIN_TIMEOUT_S
            while True:  # in short attempts, so an orphan notices its parent is gone
                try:
                    transport.connect(give_up_s=1.0)
                    break
                except HandshakeRefused:
                    raise
                except ClusterError:
                    if _parent_gone(parent_pid) or time.monotonic() > joined_by:
                        raise
            while not _parent_gone(parent_pid):
                message = transport.receive(timeout_s=1.0)
                if message is None:
                    continue
                if message.op == "shutdown":
                    return
                if message.op != "step":
                    continue
                f = message.fields
                x = message.tensors[0].clone()  # own memory, like a real partial
                calls = f["starts"][0]  # the step's one "start" says how many allreduces
                comm.position.begin(f["seq"], f["step"], calls)
                for _ in range(calls):
                    comm.allreduce(x)
        except ShutdownRequested:
            return
        except ClusterError as exc:
            log(f"worker rank {rank}: {exc}; exiting")
            sys.exit(1)
        finally:
            transport.close()
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: exit quietly
        pass


def pingpong_child(address: str, parent_pid: int) -> None:
    """Echo every message back until an empty one arrives."""
    try:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        sock.send(b"hello")
        try:
            while not _parent_gone(parent_pid):
                if not sock.poll(1000):
                    continue
                frames = sock.recv_multipart(copy=False)
                if len(frames[0]) == 0:
                    return
                sock.send_multipart(frames, copy=False)
        finally:
            sock.close(linger=0)
            ctx.term()
    except KeyboardInterrupt:
        pass


def tcp_pingpong_child(port: int, parent_pid: int) -> None:
    """Echo fixed-size messages over a plain TCP socket (TCP_NODELAY): the data link's floor.
    Each message is an 8-byte length then the payload; a zero length ends it."""
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(1.0)
        try:
            while not _parent_gone(parent_pid):
                try:
                    size = int.from_bytes(_read_exactly(sock, 8), "little")
                except TimeoutError:
                    continue
                if size == 0:
                    return
                sock.sendall(_read_exactly(sock, size))
        finally:
            sock.close()
    except (KeyboardInterrupt, OSError):
        pass


def _read_exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("the peer closed the connection")
        got += n
    return buffer


class Children:
    """Spawned processes, reaped for sure."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.procs: list[Any] = []

    def start(self, target: Any, *args: Any) -> Any:
        proc = self.ctx.Process(target=target, args=(*args, os.getpid()), daemon=True)
        proc.start()
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        dead = [p for p in self.procs if p.exitcode is not None and p.exitcode != 0]
        if dead:
            raise RuntimeError(f"child process(es) died: "
                               f"{[(p.name, p.exitcode) for p in dead]}")

    def reap(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        self.procs = [p for p in self.procs if p.is_alive()]


# -- the floor: raw ping-pong -------------------------------------------------------------------


def measure_pingpong(sizes: list[int], repeat: int, warmup: int, budget_s: float,
                     children: Children) -> dict[int, dict[str, float]]:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
    sock.bind("tcp://127.0.0.1:*")
    address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    child = children.start(pingpong_child, address)
    results: dict[int, dict[str, float]] = {}
    try:
        if not sock.poll(int(JOIN_TIMEOUT_S * 1000)):
            raise RuntimeError("the ping-pong child never connected")
        peer, _ = sock.recv_multipart()
        for size in sizes:
            payload = memoryview(bytearray(os.urandom(64)) * (size // 64 + 1)).cast("B")[:size]
            samples = []
            deadline = time.monotonic() + budget_s
            for i in range(warmup + repeat):
                started = time.perf_counter()
                sock.send_multipart([peer, payload], copy=False)
                frames = sock.recv_multipart(copy=False)
                elapsed = time.perf_counter() - started
                assert len(frames[1]) == size
                if i >= warmup:
                    samples.append(elapsed)
                    if len(samples) >= MIN_SAMPLES and time.monotonic() > deadline:
                        break
            results[size] = summarize(samples)
            log(f"  ping-pong {format_size(size):>5}: median "
                f"{results[size]['median']:9.1f} us ({len(samples)} round trips)")
        sock.send_multipart([peer, b""])
        child.join(10)
    finally:
        sock.close(linger=0)
    return results


def measure_tcp_pingpong(sizes: list[int], repeat: int, warmup: int, budget_s: float,
                         children: Children) -> dict[int, dict[str, float]]:
    """Round trips over a plain TCP socket, as the data link (edgetp.net.datalink) makes them."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(JOIN_TIMEOUT_S)
    child = children.start(tcp_pingpong_child, listener.getsockname()[1])
    results: dict[int, dict[str, float]] = {}
    conn, _ = listener.accept()
    listener.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.settimeout(TIMEOUT_S)
    try:
        for size in sizes:
            message = size.to_bytes(8, "little") + os.urandom(size)
            samples: list[float] = []
            deadline = time.monotonic() + budget_s
            for i in range(warmup + repeat):
                started = time.perf_counter()
                conn.sendall(message)
                _read_exactly(conn, size)
                if i >= warmup:
                    samples.append(time.perf_counter() - started)
                    if len(samples) >= MIN_SAMPLES and time.monotonic() > deadline:
                        break
            results[size] = summarize(samples)
            log(f"  tcp ping-pong {format_size(size):>5}: median "
                f"{results[size]['median']:9.1f} us ({len(samples)} round trips)")
        conn.sendall((0).to_bytes(8, "little"))
        child.join(10)
    finally:
        conn.close()
    return results


# -- the star allreduce -------------------------------------------------------------------------


@dataclass
class StarRun:
    """Rank 0 of an N-node benchmark cluster."""

    n_ranks: int
    children: Children
    seq: int = 0
    step: int = 0
    keys_dir: str | None = None  # CURVE keys for every rank (cluster_keys), or none
    transport: Any = None
    comm: Any = None
    procs: list[Any] = field(default_factory=list)

    def start(self) -> None:
        from edgetp.net.collectives import StarMaster
        from edgetp.net.security import KeyPair, MasterSecurity
        from edgetp.net.transport import ClusterError, MasterTransport

        keys = self.keys_dir
        security = None if keys is None else MasterSecurity(
            KeyPair.load(f"{keys}/master.key_secret"), Path(keys) / "authorized")
        with signals_blocked():  # its heartbeat thread
            self.transport = MasterTransport("tcp://127.0.0.1:*", identity(0), self.n_ranks,
                                             wire_dtype="f32", timeout_s=TIMEOUT_S,
                                             security=security)
        self.comm = StarMaster(self.transport, "f32", timeout_s=TIMEOUT_S)
        for rank in range(1, self.n_ranks):
            worker_keys = None if keys is None else (f"{keys}/worker-{rank}.key_secret",
                                                     f"{keys}/master.key")
            self.procs.append(self.children.start(star_worker, self.transport.address, rank,
                                                  self.n_ranks, worker_keys))
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while True:
            try:
                self.transport.wait_for_workers(timeout_s=1.0)
                return
            except ClusterError:
                self.children.check_alive()
                if time.monotonic() > deadline:
                    raise

    def run_step(self, x: Any, timed: int) -> tuple[list[float], list[float]]:
        """One step of ``timed + 2`` allreduces; the per-call times of the middle ones.

        Returns (allreduce seconds, of which gather seconds) per timed call.
        """
        total = timed + 2
        self.step += 1
        times, gathers = [], []
        with self.transport.lock:  # as the real master: keeps the heartbeat thread out
            self.comm.position.begin(self.seq, self.step, total)
            self.transport.broadcast("step", {"seq": self.seq, "step": self.step,
                                              "slots": [0], "starts": [total]}, [x])
            self.comm.allreduce(x)  # includes the step broadcast: not timed
            for _ in range(timed):
                waited = self.comm.wait_s
                started = time.perf_counter()
                self.comm.allreduce(x)
                times.append(time.perf_counter() - started)
                gathers.append(self.comm.wait_s - waited)
            self.comm.allreduce(x)  # the step's reduce-only last allreduce: not timed
        return times, gathers

    def measure(self, size: int, repeat: int, warmup: int,
                budget_s: float) -> tuple[list[float], list[float]]:
        """Seconds per timed allreduce of ``size`` bytes, and of each its gather."""
        import torch

        self.seq += 1
        self.step = 0
        # Zeros: StarMaster (f32 wire) sums into its float32 input in place, so any other value
        # would grow geometrically over the run; float adds cost the same whatever the value.
        x = torch.zeros((1, size // 4), dtype=torch.float32)
        warm_until = time.monotonic() + WARMUP_S
        while True:  # at least `warmup` allreduces and WARMUP_S seconds
            self.run_step(x, warmup)
            if time.monotonic() > warm_until:
                break
        samples: list[float] = []
        gathers: list[float] = []
        deadline = time.monotonic() + budget_s
        while len(samples) < repeat:
            times, waits = self.run_step(x, min(STEP_CHUNK, repeat - len(samples)))
            samples += times
            gathers += waits
            if len(samples) >= MIN_SAMPLES and time.monotonic() > deadline:
                break
        return samples, gathers

    def stop(self, graceful: bool = True) -> None:
        """Tell the workers to shut down and wait for them (graceful) or just close."""
        if self.transport is not None:
            with signals_blocked():  # a second Ctrl-C must not leave the socket open
                self.transport.close(shutdown_workers=True)
            self.transport = None
        if not graceful:
            return
        deadline = time.monotonic() + 10
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self.children.reap()
        unclean = [p.exitcode for p in self.procs if p.exitcode != 0]
        if unclean:
            log(f"  warning: worker exit codes {unclean}")


def cluster_keys(keys_dir: str, n_ranks: int) -> None:
    """Key pairs for a benchmark cluster: ``master`` and ``worker-R``, the workers' public
    keys authorized in ``keys_dir/authorized``."""
    from edgetp.net.security import create_keys

    create_keys(keys_dir, "master")
    authorized = Path(keys_dir) / "authorized"
    authorized.mkdir()
    for rank in range(1, n_ranks):
        public, _ = create_keys(keys_dir, f"worker-{rank}")
        shutil.copy(public, authorized / public.name)


def measure_cluster(n: int, args: argparse.Namespace, floors: tuple[dict[int, Any], ...],
                    children: Children, keys_dir: str | None) -> list[dict[str, Any]]:
    """The rows of an N-rank star (and, with ``keys_dir``, of one with keys beside it)."""
    runs = [StarRun(n, children)]
    if keys_dir is not None:
        cluster_keys(keys_dir, n)
        runs.append(StarRun(n, children, keys_dir=keys_dir))
    rows = []
    try:
        for run in runs:
            log(f"star allreduce, N={n}{' with keys' if run.keys_dir else ''}: starting "
                f"{n - 1} worker process(es)")
            started = time.monotonic()
            run.start()
            log(f"  all {n - 1} joined in {time.monotonic() - started:.1f} s")
        for size in args.sizes:
            rows.append(measure_size(runs, n, size, args, floors))
    except BaseException:
        for run in runs:
            run.stop(graceful=False)  # no waiting: the outer finally terminates them
        raise
    for run in runs:
        run.stop(graceful=True)
    return rows


def measure_size(runs: list[StarRun], n: int, size: int, args: argparse.Namespace,
                 floors: tuple[dict[int, Any], ...]) -> dict[str, Any]:
    """One row: the plain run's figures (and the keyed run's, in alternating rounds)."""
    rounds = SECURE_ROUNDS if len(runs) > 1 else 1
    samples: list[tuple[list[float], list[float]]] = [([], []) for _ in runs]
    for _ in range(rounds):
        for run, (times, gathers) in zip(runs, samples, strict=True):
            got = run.measure(size, max(1, args.repeat // rounds), args.warmup,
                              args.budget / rounds)
            times += got[0]
            gathers += got[1]
    floor, tcp = floors
    latency = summarize(samples[0][0])
    row = {"size": format_size(size), "size_bytes": size, "nodes": n,
           "pingpong_us": floor[size], "tcp_pingpong_us": tcp[size], "allreduce_us": latency,
           "master_gather_us": summarize(samples[0][1]),
           "ratio": latency["median"] / floor[size]["median"]}
    text = (f"  N={n} {row['size']:>5}: median {latency['median']:9.1f} us, p90 "
            f"{latency['p90']:9.1f} us ({latency['n']} allreduces), {row['ratio']:.2f}x ping-pong")
    if len(runs) > 1:
        row["secure_us"] = summarize(samples[1][0])
        row["secure_extra_us"] = row["secure_us"]["median"] - latency["median"]
        text += f"; with keys {row['secure_us']['median']:.1f} us ({row['secure_extra_us']:+.1f})"
    log(text)
    return row


def secure_verdict(rows: list[dict[str, Any]]) -> list[str]:
    """What keys add at the target size, per N (the rows of a --secure run)."""
    out = []
    for r in rows:
        if "secure_us" in r and r["size_bytes"] == SECURE_TARGET_BYTES:
            ok = r["secure_extra_us"] <= SECURE_TARGET_US
            out.append(f"N={r['nodes']}: with keys the {r['size']} allreduce costs "
                       f"{r['secure_extra_us']:+.1f} us ({r['secure_us']['median']:.1f} against "
                       f"{r['allreduce_us']['median']:.1f} us, ratio "
                       f"{r['secure_us']['median'] / r['allreduce_us']['median']:.2f}): "
                       f"{'within' if ok else 'NOT within'} the +{SECURE_TARGET_US:.0f} us "
                       "target")
    if not out and any("secure_us" in r for r in rows):
        out.append(f"(the keys target is at {format_size(SECURE_TARGET_BYTES)}: add it to "
                   "--sizes)")
    return out


# -- report -------------------------------------------------------------------------------------


def cpu_note(nodes: list[int]) -> str | None:
    cores = os.cpu_count() or 1
    crowded = [n for n in nodes if n > cores]
    if not crowded:
        return None
    return (f"this machine has {cores} CPU core(s): with N processes on {cores} cores the "
            f"workers compete for CPU, so the N={','.join(map(str, crowded))} figures include "
            f"scheduling delay, not only transport cost")


def verdicts(rows: list[dict[str, Any]], nodes: list[int]) -> list[dict[str, Any]]:
    out = []
    for n in nodes:
        small = [r for r in rows if r["nodes"] == n and r["size_bytes"] <= SMALL_BYTES]
        if not small:
            continue
        worst = max(small, key=lambda r: r["ratio"])
        ok = worst["ratio"] < TARGET_RATIO
        sizes = ", ".join(f"{r['size']} {r['ratio']:.2f}x" for r in small)
        if ok:
            text = (f"N={n}: star allreduce is under {TARGET_RATIO}x the ping-pong for messages "
                    f"<= {format_size(SMALL_BYTES)} (worst {worst['ratio']:.2f}x; {sizes})")
        else:
            excess_us = worst["allreduce_us"]["median"] - TARGET_RATIO * worst["pingpong_us"][
                "median"]
            text = (f"N={n}: star allreduce is NOT under {TARGET_RATIO}x the ping-pong for "
                    f"messages <= {format_size(SMALL_BYTES)}: worst {worst['ratio']:.2f}x at "
                    f"{worst['size']}, {worst['ratio'] / TARGET_RATIO - 1:.0%} over the target "
                    f"({excess_us:.0f} us per allreduce above {TARGET_RATIO}x ping-pong; {sizes})")
        out.append({"nodes": n, "under_target": ok, "worst_ratio": worst["ratio"],
                    "worst_size": worst["size"], "text": text})
    return out


def print_table(report: dict[str, Any]) -> None:
    print(f"star allreduce vs raw ZeroMQ and plain TCP ping-pongs (loopback, float32 "
          f"[1, size/4]; {report['cpu_count']} cores); the allreduce went over "
          f"{report['channel']}")
    print("latencies in microseconds; allreduce = median per allreduce (p90 in brackets); "
          "ratio = allreduce / ZeroMQ ping-pong")
    print()
    from cipher_cost import describe as describe_cipher  # beside this script

    secure = report["secure"]
    header = (f"{'size':>6} {'N':>3} {'ping-pong us':>13} {'tcp us':>8} {'allreduce us':>13} "
              f"{'(p90)':>10} {'ratio':>7} {'gather %':>9}"
              + (f" {'with keys us':>13} {'+us':>7}" if secure else ""))
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        gather_pct = 100 * r["master_gather_us"]["median"] / r["allreduce_us"]["median"]
        keyed = (f" {r['secure_us']['median']:13.1f} {r['secure_extra_us']:+7.1f}" if secure
                 else "")
        print(f"{r['size']:>6} {r['nodes']:>3} {r['pingpong_us']['median']:13.1f} "
              f"{r['tcp_pingpong_us']['median']:8.1f} {r['allreduce_us']['median']:13.1f} "
              f"{r['allreduce_us']['p90']:>10.1f} "
              f"{r['ratio']:6.2f}x {gather_pct:8.0f}%{keyed}")
    print()
    print("gather % = share of the master's allreduce spent in gather (waiting for and decoding "
          "the partials); the rest is its sum, encode and broadcast")
    if secure:
        print(f"with keys = the same allreduce in a cluster with CURVE keys (the sealed data "
              f"link), measured in {SECURE_ROUNDS} rounds alternating with the plain one")
    for v in report["verdicts"]:
        print(v["text"])
    for line in secure_verdict(report["results"]):
        print(line)
    if report["cipher"]:
        print("\n".join(describe_cipher(report["cipher"])))
    if report["note"]:
        print(f"note: {report['note']}")
    load = report["load_average"]
    print(f"total time {report['elapsed_s']:.1f} s; load average (1 min) {load['before']:.1f} "
          f"before, {load['after']:.1f} after, on {report['cpu_count']} cores")


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help=f"comma-separated message sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--nodes", help=f"comma-separated cluster sizes N (default "
                                        f"{DEFAULT_NODES})")
    parser.add_argument("--repeat", type=int, help="timed allreduces / round trips per "
                                                   "configuration, at most (default 500)")
    parser.add_argument("--budget", type=float, help="seconds per configuration before the "
                                                     "repeat count is cut short (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help=f"sizes {QUICK_SIZES}, nodes {QUICK_NODES}, few repeats (< 30 s)")
    parser.add_argument("--secure", action="store_true",
                        help="also measure a cluster with CURVE keys (the sealed data link), "
                             "side by side, and the cipher's cost per KiB")
    parser.add_argument("--json", action="store_true", help="print a JSON object, not a table")
    args = parser.parse_args(argv)
    try:
        args.sizes = [parse_size(s) for s in (args.sizes or (QUICK_SIZES if args.quick
                                                             else DEFAULT_SIZES)).split(",")]
        args.nodes = [int(n) for n in (args.nodes or (QUICK_NODES if args.quick
                                                      else DEFAULT_NODES)).split(",")]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    if any(n < 2 for n in args.nodes):
        parser.error("every N must be at least 2 (the master and one worker)")
    if args.repeat is None:
        args.repeat = 100 if args.quick else 500
    if args.budget is None:
        args.budget = 0.5 if args.quick else 3.0
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.warmup = max(5, min(50, args.repeat // 5))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with signals_blocked():  # the helper threads that torch and pyzmq start
        import torch

        torch.set_num_threads(1)
        zmq.Context.instance()
        try:
            from zmq.utils.garbage import gc as zmq_gc  # zero-copy sends start it lazily

            if not zmq_gc.is_alive():
                zmq_gc.start()
        except (ImportError, AttributeError):
            pass
    signal.signal(signal.SIGTERM, _interrupt)  # run the finally clauses on kill PID too
    from cipher_cost import measure as measure_cipher  # beside this script

    began, load_before = time.monotonic(), os.getloadavg()
    children = Children()
    rows: list[dict[str, Any]] = []
    try:
        log("raw ZeroMQ ping-pong (the floor)")
        floor = measure_pingpong(args.sizes, args.repeat, args.warmup, args.budget / 2,
                                 children)
        log("plain TCP ping-pong (the data link's floor)")
        tcp = measure_tcp_pingpong(args.sizes, args.repeat, args.warmup, args.budget / 2,
                                   children)
        children.reap()
        for n in args.nodes:
            with contextlib.ExitStack() as stack:
                keys_dir = (stack.enter_context(tempfile.TemporaryDirectory(prefix="edgetp-keys-"))
                            if args.secure else None)
                rows += measure_cluster(n, args, (floor, tcp), children, keys_dir)
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc.args[0] if exc.args else 'SIGINT'}); workers terminated")
        return 130
    finally:
        children.reap()
    report = {
        "benchmark": "star allreduce (edgetp MasterTransport/StarMaster + WorkerTransport/"
                     "StarWorker) vs raw ZeroMQ ROUTER/DEALER ping-pong, tcp loopback",
        "units": "microseconds",
        "cpu_count": os.cpu_count(),
        "channel": ("the data link (plain TCP)" if dataplane.enabled()
                    else "ZeroMQ (EDGETP_DATA_LINK=0)"),
        "secure": args.secure,
        "cipher": measure_cipher() if args.secure else None,
        "repeat": args.repeat,
        "budget_s": args.budget,
        "results": rows,
        "verdicts": verdicts(rows, args.nodes),
        "note": cpu_note(args.nodes),
        "elapsed_s": time.monotonic() - began,
        "load_average": {"before": load_before[0], "after": os.getloadavg()[0]},
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
