"""The one builder of the command lines that start a node: ``edgetp worker`` and ``edgetp serve``.

Every place that starts a node builds its command line here: the local cluster
(:mod:`edgetp.runtime.local`), ``edgetp launch`` over ssh, the namespace testbed and the Docker
compose file (:mod:`edgetp.ops`). So this module is the one that knows the flags of those two
commands; tests/unit/runtime/test_commands.py parses every command line it can build with the
real click commands, so a flag renamed in the CLI fails there and nowhere else. Nothing here
imports the CLI (or anything of edgetp): callers never look at the CLI to find its flags.

A command's :meth:`~NodeCommand.args` are the words after ``edgetp`` (what the testbeds'
entrypoint takes); :meth:`~NodeCommand.argv` puts ``PYTHON -m edgetp.cli`` in front, which
starts the same command with a given interpreter (a node's ``python:``, started in its home
directory). :meth:`~NodeCommand.local_argv` starts it with this interpreter from wherever the
user stands: ``python -m`` would put the working directory first on ``sys.path``, and a folder
named ``edgetp`` there (a clone of the repository) would shadow the installed package, so the
working directory is kept off the path (``-P`` from Python 3.11, a bootstrap before), while
``PYTHONPATH`` still applies.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

CLI_MODULE = "edgetp.cli"  # `python -m edgetp.cli ARGS` is `edgetp ARGS`
# `python -m edgetp.cli` without the working directory on sys.path, before Python 3.11's -P
_SAFE_PATH_BOOTSTRAP = ("import runpy, sys; del sys.path[0]; "
                        f"runpy.run_module({CLI_MODULE!r}, run_name='__main__', alter_sys=True)")


def safe_module_argv(python: str | Path, version: tuple[int, int] = sys.version_info[:2]
                     ) -> list[str]:
    """``PYTHON -m edgetp.cli`` (of a Python ``version``) that never imports from the cwd."""
    if version >= (3, 11):
        return [str(python), "-P", "-m", CLI_MODULE]
    return [str(python), "-c", _SAFE_PATH_BOOTSTRAP]


def size_text(n: int) -> str:
    """A byte count as the CLI reads it: ``256MiB`` or ``2GiB`` when exact, else plain bytes."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def number_text(x: float) -> str:
    """``10`` for 10.0, ``2.5`` for 2.5: the shortest text that reads back as ``x``."""
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


@dataclass(frozen=True)
class WorkerKeys:
    """A worker's CURVE keys: its own secret key, and the public key of its one master."""

    secret: str | Path  # NAME.key_secret (from `edgetp keys`)
    master_public: str | Path  # the master's NAME.key


@dataclass(frozen=True)
class MasterKeys:
    """A master's CURVE keys: its secret key, and the directory of the invited workers' keys."""

    secret: str | Path  # the master's NAME.key_secret
    authorized: str | Path  # a directory of workers' public NAME.key files


def _security_args(keys: WorkerKeys | MasterKeys | None, insecure: bool) -> list[str]:
    """CURVE keys, or ``--insecure`` (no keys on a trusted network), or neither (loopback)."""
    if keys is not None and insecure:
        raise ValueError("a node runs with CURVE keys or --insecure, not both")
    if isinstance(keys, WorkerKeys):
        return ["--key", str(keys.secret), "--master-key", str(keys.master_public)]
    if isinstance(keys, MasterKeys):
        return ["--keys", str(keys.secret), "--authorized", str(keys.authorized)]
    return ["--insecure"] if insecure else []


class NodeCommand(ABC):
    """What the two commands share: the words after ``edgetp``, and the ``python -m`` form."""

    @abstractmethod
    def args(self) -> list[str]:
        """The words after ``edgetp``: the command's name, then its options."""

    def argv(self, python: str | Path) -> list[str]:
        """``PYTHON -m edgetp.cli ARGS``: the command run by that interpreter."""
        return [str(python), "-m", CLI_MODULE, *self.args()]

    def local_argv(self) -> list[str]:
        """The command run by this interpreter, whatever the working directory holds."""
        return [*safe_module_argv(sys.executable), *self.args()]


@dataclass(frozen=True)
class WorkerCommand(NodeCommand):
    """``edgetp worker``: serve one rank's shard to the master at ``master``.

    Optional fields left at None are left out (the CLI's default applies).
    """

    shard_dir: str | Path  # the node's rank-K directory
    master: str  # tcp://HOST:PORT
    timeout_s: float = 10.0
    dtype: str | None = None  # float32 | bfloat16
    max_seq_len: int | None = None
    memory_budget: int | None = None  # bytes
    keys: WorkerKeys | None = None
    insecure: bool = False
    capture_frames: str | Path | None = None  # tests: a file of every frame received
    parent_pid: int | None = None  # a local cluster's master: the worker exits with it
    data_port: int | None = None  # the data link's port (None: an ephemeral one)
    threads: int | None = None  # compute threads (None: every core of the machine)
    kv_slots: int | None = None  # sequences it holds at once (None: the CLI's default)

    def args(self) -> list[str]:
        args = ["worker", "--shard", str(self.shard_dir), "--master", self.master,
                *_security_args(self.keys, self.insecure), "--timeout", number_text(self.timeout_s)]
        if self.dtype is not None:
            args += ["--dtype", self.dtype]
        if self.max_seq_len is not None:
            args += ["--max-seq-len", str(self.max_seq_len)]
        if self.memory_budget is not None:
            args += ["--memory-budget", size_text(self.memory_budget)]
        if self.capture_frames is not None:
            args += ["--capture-frames", str(self.capture_frames)]
        if self.parent_pid is not None:
            args += ["--parent-pid", str(self.parent_pid)]
        if self.data_port is not None:
            args += ["--data-port", str(self.data_port)]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        if self.kv_slots is not None:
            args += ["--kv-slots", str(self.kv_slots)]
        return args


@dataclass(frozen=True)
class ServeCommand(NodeCommand):
    """``edgetp serve --shards``: the master of a cluster, behind the OpenAI-compatible API.

    Optional fields left at None are left out (the CLI's default applies).
    """

    shard_dir: str | Path  # the rank-0 directory (or its parent)
    bind: str  # tcp://HOST:PORT the workers connect to
    host: str | None = None  # the API's HTTP address
    port: int | None = None  # the API's port
    keys: MasterKeys | None = None
    insecure: bool = False
    timeout_s: float = 10.0
    memory_budget: int | None = None  # bytes
    wire_dtype: str | None = None  # f32 | bf16 | int8
    allreduce: str | None = None  # star | ring
    model_name: str | None = None  # the API's model id
    threads: int | None = None  # compute threads (None: every core of the machine)

    def args(self) -> list[str]:
        args = ["serve", "--shards", str(self.shard_dir), "--bind", self.bind]
        if self.host is not None:
            args += ["--host", self.host]
        if self.port is not None:
            args += ["--port", str(self.port)]
        args += [*_security_args(self.keys, self.insecure),
                 "--timeout", number_text(self.timeout_s)]
        if self.memory_budget is not None:
            args += ["--memory-budget", size_text(self.memory_budget)]
        for flag, value in (("--wire-dtype", self.wire_dtype), ("--allreduce", self.allreduce),
                            ("--model-name", self.model_name)):
            if value is not None:
                args += [flag, value]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        return args
