"""A whole cluster on this machine: N processes on loopback (``generate --nodes N``, ``demo``).

The model is split into a cache directory (one per model directory and plan, checked against
the model's files by content on every start and split again when they changed), workers start as
``edgetp worker`` subprocesses, the master runs in this process, and everything is shut down
on exit, even after an error. The workers are tied to this process
(:mod:`edgetp.runtime.lifeline`): should it die without shutting them down, even by SIGKILL,
they exit too. They start with this interpreter, deaf to a folder named ``edgetp`` in the
working directory (:meth:`~edgetp.runtime.commands.NodeCommand.local_argv`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import torch

from edgetp.config.model import load_model_config
from edgetp.core import settings
from edgetp.core.errors import ClusterError
from edgetp.core.limits import PREFILL_CHUNK
from edgetp.kernels.native import usable_cores
from edgetp.kernels.threads import local_cluster_threads, use_threads
from edgetp.model.context import default_context, whole_model_bytes_per_position
from edgetp.net.security import KeyPair, MasterSecurity, create_keys
from edgetp.runtime.commands import WorkerCommand, WorkerKeys
from edgetp.runtime.lifeline import spawn_tied
from edgetp.runtime.master import Master, parse_dtype
from edgetp.shard import layout
from edgetp.shard.split import split_checkpoint

WORKER_START_TIMEOUT_S = 120.0
STOP_GRACE_S = 5.0  # a worker told to shut down has this long to exit before it is killed
TERMINATE_GRACE_S = 1.0  # ... and a terminated one (SIGTERM) this long
BUSY_MASTER_WAIT_S = 1.0  # how long stop() waits for a request to let go of the master


def cache_root() -> Path:
    return settings.cache_dir() / "splits"


def split_cache_dir(model_dir: Path, n_nodes: int, shares: tuple[float, ...] | None,
                    dtype: str | None, private_layers: int, group_size: int = 32,
                    head_dtype: str | None = None) -> Path:
    """Where the split of ``model_dir`` for this plan is cached: one directory per model
    directory and plan. Whether the split in it still matches the model's files is
    :func:`~edgetp.shard.split.split_checkpoint`'s check (by content), made on every use;
    pass ``force=True`` to it so that a stale split is replaced."""
    key = f"{n_nodes}|{shares}|{dtype}|{private_layers}"
    if dtype == "int4" or head_dtype == "int4":
        key += f"|g{group_size}"
    if head_dtype is not None:  # None: the default for the dtype (keys made before it stay)
        key += f"|h{head_dtype}"
    model = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:16]
    return cache_root() / f"{model}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """Context manager: a master (this process) and N-1 worker processes on loopback."""

    def __init__(self, model_dir: str | Path, n_nodes: int,
                 shares: tuple[float, ...] | None = None, dtype: str = "float32",
                 max_seq_len: int | None = None, private_layers: int = 0,
                 wire_dtype: str = "f32", timeout_s: float = 10.0,
                 split_dir: Path | None = None, worker_args: list[str] | None = None,
                 capture_dir: Path | None = None, memory_budget: int | None = None,
                 allreduce: str = "star", secure: bool = False,
                 weight_dtype: str | None = None, group_size: int = 32,
                 head_dtype: str | None = None, threads: int | None = None,
                 kv_slots: int = 1, prefill_chunk: int = PREFILL_CHUNK) -> None:
        self.model_dir = Path(model_dir)
        self.n_nodes = n_nodes
        self.shares = shares
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        self.private_layers = private_layers
        self.wire_dtype = wire_dtype
        self.timeout_s = timeout_s
        self.weight_dtype = weight_dtype  # stored weights: None (the checkpoint's), int8, ...
        self.group_size = group_size  # int4's group
        self.head_dtype = head_dtype  # the lm_head's (None: the default for weight_dtype)
        # compute threads per node, the master first: ``threads`` each, else the cores divided
        self.threads = ([threads] * n_nodes if threads is not None
                        else local_cluster_threads(usable_cores(), n_nodes))
        self.split_dir = split_dir or split_cache_dir(self.model_dir, n_nodes, shares,
                                                      weight_dtype, private_layers, group_size,
                                                      head_dtype)
        self.cached_split = split_dir is None  # ours to replace when the model changed
        self.worker_args = worker_args or []
        self.capture_dir = capture_dir  # tests: each worker records every frame it receives
        self.memory_budget = memory_budget  # per node, bytes
        self.allreduce = allreduce
        self.kv_slots = kv_slots  # sequences every node holds (the master's --max-batch)
        self.prefill_chunk = prefill_chunk  # prompt tokens a step carries at most (tests: fewer,
        # to see a prompt of the tiny models' contexts go in several chunks)
        self.secure = secure  # CURVE on loopback too (keys made in split_dir/keys)
        self.worker_address = ""  # tests: where workers connect, if not the master itself
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self._threads_before: int | None = None
        self.master: Master | None = None
        self.address = ""

    def __enter__(self) -> Master:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Master:
        result = split_checkpoint(self.model_dir, self.split_dir, self.n_nodes, self.shares,
                                  self.weight_dtype, force=self.cached_split,
                                  private_layers=self.private_layers, group_size=self.group_size,
                                  head_dtype=self.head_dtype)
        self.address = f"tcp://127.0.0.1:{free_port()}"
        security = self._make_keys() if self.secure else None
        if self.max_seq_len is None:  # one context for every node, fitting this machine
            self.max_seq_len = self._machine_context()
        self._threads_before = torch.get_num_threads()  # given back on stop()
        use_threads(self.threads[0])  # this process is the master
        self.master = Master.cluster(result.rank_dirs[0], self.address, self.dtype,
                                     self.max_seq_len, self.wire_dtype, self.timeout_s,
                                     memory_budget=self.memory_budget,
                                     allreduce=self.allreduce, security=security,
                                     max_batch=self.kv_slots, prefill_chunk=self.prefill_chunk)
        if not self.spins:
            self.master.set_spin(0.0)
        for rank in range(1, self.n_nodes):
            self.start_worker(rank)
        self.wait_until_joined()
        return self.master

    @property
    def spins(self) -> bool:
        """Whether the nodes' allreduces watch their links before sleeping: unless the nodes
        have more threads than the machine has cores (a spinning node would then hold a core
        the node it waits for needs), or ``EDGETP_SPIN_US`` says."""
        return settings.spin_given() or sum(self.threads) <= usable_cores()

    def _machine_context(self) -> int:
        """The default context of a cluster whose nodes all share this machine's memory."""
        config = load_model_config(self.model_dir)
        per_position = whole_model_bytes_per_position(config, parse_dtype(self.dtype).itemsize)
        return default_context(config, per_position, where=f"the {self.n_nodes} nodes")

    def _make_keys(self) -> MasterSecurity:
        """A key pair for the master and each worker; workers' public keys authorized."""
        keys = self.split_dir / "keys"
        if keys.exists():
            shutil.rmtree(keys)
        create_keys(keys, "master")
        for rank in range(1, self.n_nodes):
            public, _ = create_keys(keys, f"worker-{rank}")
            (keys / "authorized").mkdir(exist_ok=True)
            shutil.copy(public, keys / "authorized" / public.name)
        return MasterSecurity(KeyPair.load(keys / "master.key_secret"), keys / "authorized")

    def rank_dir(self, rank: int) -> Path:
        return layout.rank_dir(self.split_dir, rank)

    def start_worker(self, rank: int) -> None:
        command = self.worker_command(rank).local_argv() + self.worker_args
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads[rank])}
        if not self.spins:
            env[settings.ENV_SPIN] = "0"
        self.log_path(rank).parent.mkdir(parents=True, exist_ok=True)
        with self.log_path(rank).open("ab") as log_file:
            self.workers[rank] = spawn_tied(command, env=env, stdin=subprocess.DEVNULL,
                                            stdout=log_file, stderr=subprocess.STDOUT)

    def worker_command(self, rank: int) -> WorkerCommand:
        """``edgetp worker`` for ``rank`` (with its keys when secure, its frame file in tests)."""
        keys = self.split_dir / "keys"
        capture = None if self.capture_dir is None else self.capture_dir / f"rank-{rank}.frames"
        return WorkerCommand(self.rank_dir(rank), self.worker_address or self.address,
                             self.timeout_s, self.dtype, self.max_seq_len or None,
                             self.memory_budget,
                             WorkerKeys(keys / f"worker-{rank}.key_secret", keys / "master.key")
                             if self.secure else None, capture_frames=capture,
                             parent_pid=os.getpid(), threads=self.threads[rank],
                             kv_slots=self.kv_slots)

    def log_path(self, rank: int) -> Path:
        return self.split_dir / "logs" / f"rank-{rank}.log"

    def wait_until_joined(self, timeout_s: float = WORKER_START_TIMEOUT_S) -> None:
        assert self.master is not None
        master = self.master
        deadline = time.monotonic() + timeout_s
        while master.missing_ranks() or self._stale_ranks(master):
            for rank, proc in self.workers.items():
                if proc.poll() is not None:
                    err = self.log_path(rank).read_text(errors="replace")[-2000:]
                    raise ClusterError(f"worker rank {rank} exited with status "
                                       f"{proc.returncode} before joining:\n{err}")
            if time.monotonic() > deadline:
                late = sorted(master.missing_ranks() + self._stale_ranks(master))
                raise ClusterError(f"workers {late} did not join in {timeout_s:g} s")
            time.sleep(0.05)

    def _stale_ranks(self, master: Master) -> list[int]:
        """Ranks the master still lists under a previous process (killed, not yet noticed)."""
        pids = master.worker_pids()
        return [rank for rank, proc in self.workers.items()
                if rank in pids and pids[rank] != proc.pid]

    def kill_worker(self, rank: int) -> None:
        proc = self.workers.pop(rank)
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        """Tell the workers to exit and close the master; within seconds, even mid-request.

        A request whose step is stuck (a worker busy or hung) holds the master: its workers
        are then terminated, which fails that step, and the master closed after it.
        """
        master, self.master = self.master, None
        told = master is None or master.close(shutdown_workers=True, wait_s=BUSY_MASTER_WAIT_S)
        if not told:
            for proc in self.workers.values():
                proc.terminate()
        self._reap_workers(STOP_GRACE_S if told else TERMINATE_GRACE_S)
        if not told:
            assert master is not None
            master.close(wait_s=BUSY_MASTER_WAIT_S)  # if the failed step has let go by now
        if self._threads_before is not None:  # this process's threads, as before start()
            use_threads(self._threads_before)
            self._threads_before = None

    def _reap_workers(self, grace_s: float) -> None:
        """Wait for every worker to exit, all within ``grace_s``; kill those still running."""
        deadline = time.monotonic() + grace_s
        for proc in self.workers.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.workers.clear()
