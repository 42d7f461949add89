"""``edgetp launch`` / ``edgetp status``: start, watch and stop a cluster of home machines over SSH.

``edgetp launch CLUSTER.yaml`` (see :mod:`edgetp.config.cluster` for the file):

1. **check** every node with one ssh command each: Python version, edgetp version, free memory
   and disk, rsync, running edgetp processes;
2. **split** the model on this machine if ``model`` is a checkpoint (once; cached), or use the
   split ``model`` points at;
3. **ship** each node only its own ``rank-K/``: the manifest's sha256 of every file is compared
   with the node's copy (which the node re-hashes only when a file's size or mtime changed), and
   only the files that differ are copied, ``manifest.json`` last. With rsync on both ends:
   ``rsync --partial-dir`` (an interrupted file resumes); otherwise the files go through one
   ssh session per node into ``.NAME.part`` files, each resuming from its partial size. Either
   way the node then checks the sha256 before a file takes its place;
4. **(re)start the workers** detached (``nohup``, own session): ``python -m edgetp.cli worker``,
   output in ``CACHE/logs/CLUSTER-NODE.log``, pid in ``CACHE/run/CLUSTER-NODE.pid`` (CACHE is
   the node's ``cache_dir``, ``~/.cache/edgetp`` by default);
5. **start the master**: in this process (prompts from ``--prompt`` or standard input), or with
   ``--serve`` ``edgetp serve`` detached on node 0; either way wait until every worker joined.

``edgetp launch --stop`` stops what the pid files name (only edgetp processes). ``edgetp status``
shows per node: reachable, versions, memory, disk, running processes and the ssh echo round
trip (a message through an open ssh session: the link's RTT plus ssh's own overhead).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgetp import __version__
from edgetp.config.cluster import ClusterConfig, NodeConfig
from edgetp.config.links import transport_only
from edgetp.core.errors import ClusterError
from edgetp.core.settings import environment

SSH_BASE = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=10",
            "-o", "ServerAliveCountMax=3")
CHUNK = 1 << 20
MIN_PYTHON = (3, 10)
Log = Callable[[str], None]
Progress = Callable[[str, str, int, int], None]  # node, file, bytes done, bytes total


class LaunchError(ClusterError):
    """The cluster cannot be launched as configured; the message names the node and the fix."""


# -- scripts run on the nodes (python, with one JSON argument; they print one JSON line) ---------

_COMMON = r'''
import hashlib, json, os, signal, subprocess, sys, time
A = json.loads(sys.argv[1])
P = os.path.expanduser
def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        r = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True)
        return r.stdout
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except OSError:
        pass
    return "edgetp" in cmdline(pid)
def pid_of(pidfile):
    try:
        with open(P(pidfile)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None
def tail(path, n=3000):
    try:
        with open(P(path), "rb") as f:
            f.seek(0, 2); f.seek(max(0, f.tell() - n)); return f.read().decode(errors="replace")
    except OSError:
        return ""
def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 22), b""):
            h.update(b)
    return h.hexdigest()
'''

PROBE = _COMMON + r'''
import platform, shutil
out = {"python": platform.python_version(), "host": platform.node(), "edgetp": None}
try:
    import edgetp
    out["edgetp"] = edgetp.__version__
except Exception as e:
    out["edgetp_error"] = repr(e)
mem = {}
try:
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            mem[k] = int(v.split()[0]) * 1024
except OSError:
    try:
        import psutil
        vm = psutil.virtual_memory()
        mem = {"MemTotal": vm.total, "MemAvailable": vm.available}
    except Exception:
        pass
out["mem_total"], out["mem_available"] = mem.get("MemTotal"), mem.get("MemAvailable")
d = P(A["shard_dir"])
p = os.path.abspath(d)
while not os.path.isdir(p):
    p = os.path.dirname(p)
out["disk_free"] = shutil.disk_usage(p).free
out["shard_present"] = os.path.isfile(os.path.join(d, "manifest.json"))
out["rsync"] = shutil.which("rsync") is not None
out["pids"] = {k: pid_of(v) for k, v in A.get("pidfiles", {}).items()}
out["logs"] = {k: tail(v) for k, v in A.get("logs", {}).items()}
print(json.dumps(out))
'''

CHECK = _COMMON + r'''
d = P(A["dir"])
os.makedirs(d, exist_ok=True)
cache_path = os.path.join(d, ".edgetp-verified.json")
try:
    with open(cache_path) as f:
        cache = json.load(f)
except (OSError, ValueError):
    cache = {}
out = {}
for name, (size, digest) in A["files"].items():
    p, part = os.path.join(d, name), os.path.join(d, "." + name + ".part")
    partial = os.path.getsize(part) if os.path.isfile(part) else 0
    try:
        st = os.stat(p)
    except OSError:
        out[name] = ["missing", partial]
        continue
    if st.st_size != size:
        out[name] = ["size", partial]
        continue
    key = [st.st_size, st.st_mtime_ns]
    got = cache[name][2] if cache.get(name, [None])[:2] == key else sha(p)
    cache[name] = key + [got]
    out[name] = ["ok" if got == digest else "sha256", partial]
with open(cache_path + ".tmp", "w") as f:
    json.dump(cache, f)
os.replace(cache_path + ".tmp", cache_path)
print(json.dumps(out))
'''

RECEIVE = _COMMON + r'''
d = P(A["dir"])
os.makedirs(d, exist_ok=True)
src = sys.stdin.buffer
for name, offset in A["send"]:  # each file from offset to its end, in this order
    size = A["files"][name][0]
    with open(os.path.join(d, "." + name + ".part"), "ab" if offset else "wb") as f:
        left = size - offset
        while left:
            block = src.read(min(left, 1 << 20))
            if not block:
                break
            f.write(block)
            left -= len(block)
out = {}
for name, (size, digest) in A["files"].items():  # verified, then moved into place in order
    part = os.path.join(d, "." + name + ".part")
    if not os.path.isfile(part) or os.path.getsize(part) < size:
        out[name] = "incomplete; launch again to resume"
    elif os.path.getsize(part) > size or sha(part) != digest:
        out[name] = "bad copy (size or sha256 differ); it will be sent again"
        os.remove(part)
    else:
        os.replace(part, os.path.join(d, name))
        out[name] = "ok"
print(json.dumps(out))
'''

START = _COMMON + r'''
for sub in ("logs", "run"):
    os.makedirs(os.path.join(P(A["cache"]), sub), exist_ok=True)
argv = [P(A["argv"][0])] + A["argv"][1:]
env = dict(os.environ, **A["env"])
with open(P(A["log"]), "ab") as f:
    f.write(("=== %s edgetp launch: %s\n" % (time.strftime("%F %T"), " ".join(argv))).encode())
    f.flush()
    p = subprocess.Popen(["nohup"] + argv, stdin=subprocess.DEVNULL, stdout=f,
                         stderr=subprocess.STDOUT, env=env, start_new_session=True,
                         cwd=P("~"))
with open(P(A["pidfile"]), "w") as f:
    f.write(str(p.pid))
time.sleep(A["settle"])
code = p.poll()
print(json.dumps({"pid": p.pid, "exited": code, "tail": "" if code is None else tail(A["log"])}))
'''

STOP = _COMMON + r'''
out = {}
for name, pidfile in A["pidfiles"].items():
    pid = pid_of(pidfile)
    if pid is None:
        out[name] = "not running"
    else:
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + A["grace"]
        while alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        out[name] = "stopped pid %d" % pid
    if os.path.exists(P(pidfile)):
        os.remove(P(pidfile))
print(json.dumps(out))
'''

HEALTH = r'''
import json, sys, urllib.request
try:
    with urllib.request.urlopen("http://127.0.0.1:%d/health" % int(sys.argv[1]), timeout=3) as r:
        print(r.read().decode())
except Exception as e:
    print(json.dumps({"error": repr(e)}))
'''

ECHO = "import sys\nfor line in sys.stdin:\n    sys.stdout.write(line)\n    sys.stdout.flush()\n"


# -- running commands on a node ----------------------------------------------------------------

def sh_path(path: str) -> str:
    """``path`` for the node's ``sh``: a leading ``~/`` expanded there, the rest quoted."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


class NodeShell:
    """Runs ``sh`` commands on one node: over ssh, or here when the node has no ``ssh``."""

    def __init__(self, config: ClusterConfig, node: NodeConfig) -> None:
        self.config = config
        self.node = node
        local_default = node.is_local and node.python == "python3"
        self.python = sys.executable if local_default else node.python

    @property
    def where(self) -> str:
        return f"node {self.node.rank} ({self.node.name}, {self.node.ssh or 'this machine'})"

    def ssh_argv(self) -> list[str]:
        """``ssh [options]`` without the host (rsync's ``-e`` wants exactly this).

        Connections share one ssh session per node (``ControlMaster``) while
        :func:`multiplexed` holds it open; without it every command connects anew.
        """
        options = [os.path.expanduser(o) for o in self.config.ssh_options]
        port = ["-p", str(self.node.ssh_port)] if self.node.ssh_port else []
        control = ["-o", f"ControlPath={_control_dir()}/%C", "-o", "ControlMaster=auto"]
        return ["ssh", *SSH_BASE, *control, *options, *port]

    def argv(self, command: str) -> list[str]:
        if self.node.is_local:
            return ["sh", "-c", command]
        return [*self.ssh_argv(), self.node.ssh_host, "sh -c " + shlex.quote(command)]

    def run(self, command: str, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        stdin = subprocess.DEVNULL if input is None else None
        try:
            return subprocess.run(self.argv(command), capture_output=True, text=True, input=input,
                                  timeout=timeout, stdin=stdin, check=False)
        except subprocess.TimeoutExpired:
            raise LaunchError(f"{self.where}: no answer within {timeout:g} s") from None

    def python_command(self, script: str, args: Any) -> str:
        return (f"{sh_path(self.python)} -c {shlex.quote(script)} "
                f"{shlex.quote(json.dumps(args))}")

    def script(self, script: str, args: Any, timeout: float = 600.0) -> Any:
        """Run one of the node scripts above; its JSON answer."""
        result = self.run(self.python_command(script, args), timeout)
        lines = result.stdout.strip().splitlines()
        if result.returncode == 0 and lines:
            return json.loads(lines[-1])
        raise LaunchError(f"{self.where}: {self._failure(result)}")

    def _failure(self, result: subprocess.CompletedProcess[str]) -> str:
        err = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        if result.returncode == 255 and not self.node.is_local:
            return (f"cannot ssh to {self.node.ssh} ({err}); check that `ssh {self.node.ssh} "
                    "true` works without a password prompt (a key in ssh-agent or ssh_options)")
        if result.returncode == 127:
            return (f"{self.python} not found ({err}); set `python:` for this node to the "
                    "interpreter that has edgetp installed")
        return err


_MULTIPLEXED: set[str] = set()  # ssh targets with an open shared session


def _control_dir() -> Path:
    path = Path(tempfile.gettempdir()) / f"edgetp-ssh-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


@contextlib.contextmanager
def multiplexed(config: ClusterConfig) -> Iterator[None]:
    """One persistent ssh session per remote node for the block (ControlPersist), then closed.

    The session is opened on its own (``-M -N -f``, no pipes), so that no command waits on a
    pipe the persisting session would hold open.
    """
    shells = {n.ssh: NodeShell(config, n) for n in config.nodes
              if n.ssh is not None and n.ssh not in _MULTIPLEXED}  # (nested: already open)
    _MULTIPLEXED.update(shells)

    def run(shell: NodeShell, *args: str) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run([*shell.ssh_argv(), *args, shell.node.ssh_host], timeout=30,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(shells)))) as pool:
        list(pool.map(lambda sh: run(sh, "-M", "-N", "-f", "-o", "ControlPersist=600"),
                      shells.values()))
    try:
        yield
    finally:
        for target, shell in shells.items():
            run(shell, "-O", "exit")
            _MULTIPLEXED.discard(target)


# -- names on a node ---------------------------------------------------------------------------

def node_shard_dir(config: ClusterConfig, node: NodeConfig) -> str:
    return str(config.local_path(node.shard_dir)) if node.is_local else node.shard_dir


def _cache(node: NodeConfig) -> str:
    return node.cache_dir.rstrip("/")


def log_file(config: ClusterConfig, node: NodeConfig, role: str = "") -> str:
    return f"{_cache(node)}/logs/{config.name}-{role or node.name}.log"


def pid_file(config: ClusterConfig, node: NodeConfig, role: str = "") -> str:
    return f"{_cache(node)}/run/{config.name}-{role or node.name}.pid"


def _roles(config: ClusterConfig, node: NodeConfig) -> dict[str, str]:
    """Pid files by role: each worker's, and node 0's for a detached (``--serve``) master."""
    if node.rank == 0:
        return {"master": pid_file(config, node, "master")}
    return {"worker": pid_file(config, node)}


# -- the model's split on this machine ---------------------------------------------------------

def prepare_split(config: ClusterConfig, log: Log) -> Path:
    """The local split directory (rank-0 ... rank-N-1), splitting the checkpoint if needed."""
    from edgetp.shard.manifest import read_manifest

    model = config.local_path(config.model)
    n = len(config.nodes)
    if (model / "rank-0" / "manifest.json").is_file():
        plan = read_manifest(model / "rank-0").plan
        if plan.n_ranks != n or not _same_shares(plan.shares, config.shares):
            raise LaunchError(f"the split at {model} is for {plan.n_ranks} nodes with shares "
                              f"{list(plan.shares)}; the cluster has {n} with shares "
                              f"{list(config.shares)}: split again with `edgetp split MODEL "
                              f"--nodes {n}` or point `model` at the checkpoint")
        return model
    if not (model / "config.json").is_file():
        raise LaunchError(f"model {config.model!r} ({model}) is neither a checkpoint directory "
                          "(config.json) nor a split (rank-0/manifest.json); launch needs one "
                          "of them on this machine")
    from edgetp.runtime.local import split_cache_dir
    from edgetp.shard.split import split_checkpoint

    shares = None if len(set(config.shares)) == 1 else config.shares
    out = (config.local_path(config.split_dir) if config.split_dir else
           split_cache_dir(model, n, shares, None, config.private_layers))
    log(f"splitting {model} for {n} nodes into {out} (skipped if already done) ...")
    split_checkpoint(model, out, n, shares, private_layers=config.private_layers)
    return out


def _same_shares(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    if len(a) != len(b):
        return False
    return all(abs(x / sum(a) - y / sum(b)) < 1e-6 for x, y in zip(a, b, strict=True))


def local_files(rank_dir: Path) -> dict[str, tuple[int, str]]:
    """Every file of a rank directory: (size, sha256); manifest.json last."""
    from edgetp.shard.manifest import read_manifest

    files = {name: (e.size, e.sha256) for name, e in read_manifest(rank_dir).files.items()}
    for path in sorted(rank_dir.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in files:
            files[path.name] = (path.stat().st_size, _sha256(path))
    manifest = files.pop("manifest.json")
    return {**files, "manifest.json": manifest}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(4 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- shipping ----------------------------------------------------------------------------------

@dataclass
class ShipResult:
    node: str
    method: str  # "rsync --partial-dir" or "one ssh stream (resumable files)"
    copied: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    up_to_date: int = 0

    def describe(self) -> str:
        if not self.copied:
            return f"{self.node}: all {self.up_to_date} files up to date"
        return (f"{self.node}: copied {len(self.copied)} file(s), "
                f"{self.bytes_sent / 2**20:.1f} MiB with {self.method} "
                f"({self.up_to_date} already up to date)")


def choose_method(shell: NodeShell, remote_has_rsync: bool, wanted: str = "auto") -> str:
    have = shutil.which("rsync") is not None and (shell.node.is_local or remote_has_rsync)
    if wanted == "rsync" and not have:
        raise LaunchError(f"{shell.where}: --transfer rsync, but rsync is missing here or there")
    return "rsync" if wanted == "rsync" or (wanted == "auto" and have) else "stream"


def ship(shell: NodeShell, source: Path, dest: str, method: str,
         progress: Progress | None = None, rsync_output: int | None = None) -> ShipResult:
    """Make ``dest`` on the node an exact copy of the local rank directory ``source``."""
    expected = local_files(source)
    state = shell.script(CHECK, {"dir": dest, "files": expected})
    todo = {name: expected[name] for name in expected if state[name][0] != "ok"}
    label = "rsync --partial-dir" if method == "rsync" else "one ssh stream (resumable files)"
    result = ShipResult(shell.node.name, label, up_to_date=len(expected) - len(todo))
    if not todo:
        return result
    if method == "rsync":
        _rsync(shell, source, dest, list(todo), rsync_output)
        result.bytes_sent = sum(size for size, _ in todo.values())
        state = shell.script(CHECK, {"dir": dest, "files": todo})
        bad = {name: s[0] for name, s in state.items() if s[0] != "ok"}
    else:
        offsets = {name: state[name][1] if 0 < state[name][1] < size else 0
                   for name, (size, _) in todo.items()}
        answers = _stream(shell, source, dest, todo, offsets, progress)
        result.bytes_sent = sum(size - offsets[name] for name, (size, _) in todo.items())
        bad = {name: answer for name, answer in answers.items() if answer != "ok"}
    if bad:
        raise LaunchError(f"{shell.where}: copies failed their check: {bad}; launch again")
    result.copied = list(todo)
    return result


def _stream(shell: NodeShell, source: Path, dest: str, todo: dict[str, tuple[int, str]],
            offsets: dict[str, int], progress: Progress | None) -> dict[str, str]:
    """Send the files (each from its offset) through one ssh session into ``.NAME.part`` files
    that the node verifies (sha256) and moves into place; the node's answer per file."""
    args = {"dir": dest, "files": todo, "send": [[name, offsets[name]] for name in todo]}
    proc = subprocess.Popen(shell.argv(shell.python_command(RECEIVE, args)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        for name, (size, _) in todo.items():
            done = offsets[name]
            with (source / name).open("rb") as handle:
                handle.seek(done)
                for block in iter(lambda: handle.read(CHUNK), b""):
                    proc.stdin.write(block)
                    done += len(block)
                    if progress:
                        progress(shell.node.name, name, done, size)
    except BrokenPipeError:
        pass  # the node's side failed: its message follows
    out, err = proc.communicate(timeout=600)  # closes stdin: the end of the stream
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise LaunchError(f"{shell.where}: sending the shard failed: "
                          f"{err.decode(errors='replace').strip()[-300:]} (launch again: "
                          "files resume where they stopped)")
    return dict(json.loads(lines[-1]))


def _rsync(shell: NodeShell, source: Path, dest: str, names: list[str],
           output: int | None) -> None:
    if shell.node.is_local:
        target = dest.rstrip("/") + "/"
        Path(dest).mkdir(parents=True, exist_ok=True)
        ssh: list[str] = []
    else:  # rsync's remote paths are relative to the home directory: drop a leading ~/
        remote = dest[2:] if dest.startswith("~/") else dest
        target = f"{shell.node.ssh_host}:{remote.rstrip('/')}/"
        ssh = ["-e", shlex.join(shell.ssh_argv())]
    command = ["rsync", "-t", "--partial-dir=.edgetp-partial", "--progress", *ssh,
               *[str(source / name) for name in names], target]
    result = subprocess.run(command, stdout=output if output is not None else subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise LaunchError(f"{shell.where}: rsync failed ({result.stderr.strip()[-300:]}); "
                          "launch again to resume, or --transfer stream")


# -- checks ------------------------------------------------------------------------------------

def probe_all(config: ClusterConfig, with_logs: bool = False) -> dict[int, dict[str, Any]]:
    """One ssh command per node, in parallel; a node that cannot be reached has ``error``."""
    def probe(node: NodeConfig) -> dict[str, Any]:
        shell = NodeShell(config, node)
        args: dict[str, Any] = {"shard_dir": node_shard_dir(config, node),
                                "pidfiles": _roles(config, node)}
        if with_logs:
            role = "master" if node.rank == 0 else ""
            args["logs"] = {"log": log_file(config, node, role)}
        try:
            return shell.script(PROBE, args, timeout=60)
        except LaunchError as exc:
            return {"error": str(exc)}

    with ThreadPoolExecutor(max_workers=min(16, len(config.nodes))) as pool:
        return dict(zip((n.rank for n in config.nodes), pool.map(probe, config.nodes),
                        strict=True))


def check_nodes(config: ClusterConfig, facts: dict[int, dict[str, Any]], log: Log) -> None:
    """Log each node's facts; raise listing every blocking problem at once."""
    problems = []
    for node in config.nodes:
        f = facts[node.rank]
        if "error" in f:
            problems.append(f["error"])
            continue
        log(f"  {node.name:<12} python {f['python']}, edgetp {f['edgetp'] or '-'}, "
            f"{_gib(f.get('mem_available'))} of {_gib(f.get('mem_total'))} memory free, "
            f"{_gib(f['disk_free'])} disk free" + (", rsync" if f["rsync"] else ""))
        where = f"node {node.rank} ({node.name})"
        if tuple(int(x) for x in f["python"].split(".")[:2]) < MIN_PYTHON:
            problems.append(f"{where}: Python {f['python']} is too old; edgetp needs 3.10+")
        if f["edgetp"] is None:
            problems.append(f"{where}: edgetp is not installed for {node.python} "
                            "(pip install edgetp there, or set `python:` for the node)")
        elif f["edgetp"] != __version__:
            log(f"  warning: {where} runs edgetp {f['edgetp']}, this machine {__version__}")
        if node.memory_budget and (f.get("mem_available") or node.memory_budget) < \
                node.memory_budget:
            log(f"  warning: {where} has {_gib(f.get('mem_available'))} free memory, less than "
                f"its memory_budget {_gib(node.memory_budget)}")
    if problems:
        raise LaunchError("cannot launch:\n  " + "\n  ".join(problems))


def check_disks(config: ClusterConfig, facts: dict[int, dict[str, Any]],
                rank_bytes: dict[int, int]) -> None:
    """A node without its shard needs the disk space for it."""
    problems = []
    for node in config.nodes:
        f, need = facts[node.rank], rank_bytes.get(node.rank, 0)
        if not f["shard_present"] and f["disk_free"] < need:
            problems.append(f"node {node.rank} ({node.name}): {_gib(f['disk_free'])} free disk "
                            f"for a {_gib(need)} shard; free some space or change shard_dir")
    if problems:
        raise LaunchError("cannot launch:\n  " + "\n  ".join(problems))


def _gib(n: Any) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def echo_rtt_ms(shell: NodeShell, count: int = 5, timeout_s: float = 10.0) -> float | None:
    """Best round trip of a line through an open ssh session to the node (ms), or None."""
    command = f"{sh_path(shell.python)} -u -c {shlex.quote(ECHO)}"
    proc = subprocess.Popen(shell.argv(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    samples = []
    try:
        for _ in range(count + 1):  # the first one includes the session's start
            started = time.perf_counter()
            proc.stdin.write(b"x\n")
            proc.stdin.flush()
            got = b""
            while not got.endswith(b"\n"):
                ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
                chunk = os.read(proc.stdout.fileno(), 64) if ready else b""
                if not chunk:
                    return None
                got += chunk
            samples.append(time.perf_counter() - started)
    except (BrokenPipeError, OSError):
        return None
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return min(samples[1:]) * 1000 if len(samples) > 1 else None


# -- the launcher ------------------------------------------------------------------------------

@dataclass
class Launcher:
    config: ClusterConfig
    log: Log = lambda line: None  # noqa: E731
    transfer: str = "auto"  # auto | rsync | stream
    ship_shards: bool = True
    emulate_links: bool = False  # delay sends by each node's link profile (transport hook)
    progress: Progress | None = None
    rsync_output: int | None = None  # a file descriptor for rsync's progress, or captured
    shipped: list[ShipResult] = field(default_factory=list)

    def prepare(self) -> None:
        """Check the nodes, split, ship the shards and (re)start the workers."""
        with multiplexed(self.config):
            self._prepare()

    def _prepare(self) -> None:
        config = self.config
        self.log(f"checking {len(config.nodes)} nodes ...")
        facts = probe_all(config)
        check_nodes(config, facts, self.log)
        split = prepare_split(config, self.log)
        check_disks(config, facts, {n.rank: sum(s for s, _ in local_files(
            split / f"rank-{n.rank}").values()) for n in config.nodes})
        if self.ship_shards:
            for node in config.nodes:
                self._ship(node, split / f"rank-{node.rank}", facts[node.rank])
        if config.security.curve:
            self._prepare_keys()
        stop_cluster(config, self.log, workers_only=False)
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(config.workers)))) as pool:
            list(pool.map(lambda node: self._start(
                node, self._worker_argv(node), pid_file(config, node), log_file(config, node),
                self._env(node)), config.workers))

    def _ship(self, node: NodeConfig, source: Path, facts: dict[str, Any]) -> None:
        shell = NodeShell(self.config, node)
        dest = node_shard_dir(self.config, node)
        if node.is_local and Path(dest).resolve() == source.resolve():
            return
        method = choose_method(shell, facts.get("rsync", False), self.transfer)
        result = ship(shell, source, dest, method, self.progress, self.rsync_output)
        self.shipped.append(result)
        self.log("  " + result.describe())

    def _prepare_keys(self) -> None:
        """CURVE: key pairs in keys_dir (made when missing); each worker gets its secret and
        the master's public key over ssh; the master authorizes the workers' public keys."""
        from edgetp.net.security import create_keys  # the CURVE feature (`edgetp keys`)

        keys = self.config.local_path(self.config.security.keys_dir or "")
        (keys / "authorized").mkdir(parents=True, exist_ok=True)
        for name in ["master", *(n.name for n in self.config.workers)]:
            if not (keys / f"{name}.key_secret").is_file():
                create_keys(keys, name)
        for node in self.config.workers:
            shutil.copyfile(keys / f"{node.name}.key", keys / "authorized" / f"{node.name}.key")
            target = sh_path(f"{_cache(node)}/keys")
            for name in (f"{node.name}.key_secret", "master.key"):
                command = f"umask 077 && mkdir -p {target} && cat > {target}/{shlex.quote(name)}"
                result = NodeShell(self.config, node).run(command, input=(keys / name).read_text())
                if result.returncode != 0:
                    raise LaunchError(f"node {node.rank} ({node.name}): cannot install its "
                                      f"keys: {result.stderr.strip()[-300:]}")

    def _security_args(self, role: str, node: NodeConfig) -> list[str]:
        """The CURVE flags of ``edgetp ROLE`` (worker or serve), or ``--insecure`` without."""
        from edgetp.cli import main as cli

        params = {p.name for p in cli.commands[role].params}
        if not self.config.security.curve:
            return ["--insecure"] if "insecure" in params else []
        if not {"key_file", "keys_file"} & params:
            raise LaunchError(f"security.curve is on, but `edgetp {role}` of this edgetp has "
                              "no CURVE options")
        if role == "worker":
            return ["--key", f"{_cache(node)}/keys/{node.name}.key_secret",
                    "--master-key", f"{_cache(node)}/keys/master.key"]
        keys = self.config.local_path(self.config.security.keys_dir or "")
        return ["--keys", str(keys / "master.key_secret"), "--authorized",
                str(keys / "authorized")]

    def _worker_argv(self, node: NodeConfig) -> list[str]:
        c = self.config
        argv = [NodeShell(c, node).python, "-m", "edgetp.cli", "worker", "--shard",
                node_shard_dir(c, node), "--master", c.master.url, "--timeout", f"{c.timeout_s:g}"]
        if node.memory_budget:
            argv += ["--memory-budget", str(node.memory_budget)]
        return argv + self._security_args("worker", node)

    def _env(self, node: NodeConfig) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": str(node.threads)} if node.threads else {}
        profile = self.config.link_profile(node)
        if self.emulate_links and profile is not None:
            env.update(transport_only(profile, "launch --emulate-links: no tc").env())
        return env

    def _start(self, node: NodeConfig, argv: list[str], pidfile: str, log: str,
               env: dict[str, str]) -> int:
        args = {"cache": _cache(node), "argv": argv, "env": env, "pidfile": pidfile, "log": log,
                "settle": 0.3}
        answer = NodeShell(self.config, node).script(START, args, timeout=60)
        if answer["exited"] is not None:
            raise LaunchError(f"node {node.rank} ({node.name}): `{' '.join(argv)}` exited with "
                              f"status {answer['exited']}:\n{answer['tail']}")
        self.log(f"  started {argv[3]} on {node.name} (pid {answer['pid']}, log {log})")
        return int(answer["pid"])

    def master_shard_dir(self) -> Path:
        return Path(node_shard_dir(self.config, self.config.nodes[0]))

    @contextlib.contextmanager
    def running_master(self, dtype: str = "float32", max_seq_len: int | None = None,
                       join_timeout_s: float = 300.0) -> Iterator[Any]:
        """The master in this process once every worker has joined; closed on exit."""
        import inspect

        from edgetp.runtime.master import Master

        c, node0 = self.config, self.config.nodes[0]
        if not node0.is_local:
            raise LaunchError("node 0 is the master and has ssh: run `edgetp launch` on it, or "
                              "use --serve to start `edgetp serve` there")
        kwargs: dict[str, Any] = {}
        if c.security.curve and "security" in inspect.signature(Master.cluster).parameters:
            from edgetp.net.security import KeyPair, MasterSecurity

            keys = c.local_path(c.security.keys_dir or "")
            kwargs["security"] = MasterSecurity(KeyPair.load(keys / "master.key_secret"),
                                                keys / "authorized")
        with environment(self._env(node0)):  # the transport reads the link hook when made
            master = Master.cluster(self.master_shard_dir(), c.master.bind, dtype, max_seq_len,
                                    c.wire_dtype, c.timeout_s, memory_budget=node0.memory_budget,
                                    allreduce=c.allreduce, **kwargs)
        try:
            self.wait_for_join(master.missing_ranks,
                               lambda: master.wait_for_workers(1.0),
                               join_timeout_s)
            yield master
        finally:
            master.close(shutdown_workers=False)

    def wait_for_join(self, missing: Callable[[], list[int]], wait: Callable[[], None],
                      timeout_s: float) -> None:
        """Until ``missing()`` is empty; a worker that died meanwhile fails it with its log."""
        deadline = time.monotonic() + timeout_s
        next_check = time.monotonic() + 3.0
        self.log(f"waiting for {len(self.config.workers)} workers to join {self.config.master.url}")
        while missing():
            try:
                wait()
            except LaunchError:
                raise
            except Exception:  # noqa: BLE001 - not joined yet (ClusterError, no answer)
                pass
            if not missing():
                break
            if time.monotonic() > next_check:
                self._fail_if_dead(missing())
                next_check = time.monotonic() + 5.0
            if time.monotonic() > deadline:
                logs = log_file(self.config, self.config.nodes[-1])
                raise LaunchError(f"workers {missing()} did not join within {timeout_s:g} s; "
                                  f"see their logs (e.g. {logs} on the node) and check the "
                                  "master's address and firewall")
        self.log("all workers joined")

    def _fail_if_dead(self, ranks: list[int]) -> None:
        facts = probe_all(self.config, with_logs=True)
        for rank in ranks:
            f = facts[rank]
            if "error" not in f and f["pids"].get("worker") is None:
                raise LaunchError(f"worker {rank} ({self.config.nodes[rank].name}) is not "
                                  f"running; the end of its log:\n{f['logs']['log'][-1500:]}")

    def serve(self, port: int = 8000, join_timeout_s: float = 300.0,
              extra: list[str] | None = None) -> str:
        """``edgetp serve`` detached on node 0 (loopback there); returns its URL once joined."""
        c, node0 = self.config, self.config.nodes[0]
        shell = NodeShell(c, node0)
        argv = [shell.python, "-m", "edgetp.cli", "serve", "--shards", str(self.master_shard_dir())
                if node0.is_local else node0.shard_dir, "--bind", c.master.bind, "--port",
                str(port), "--wire-dtype", c.wire_dtype, "--allreduce", c.allreduce,
                "--timeout", f"{c.timeout_s:g}", "--model-name", Path(c.model).name,
                *(extra or [])]
        if node0.memory_budget:
            argv += ["--memory-budget", str(node0.memory_budget)]
        argv += self._security_args("serve", node0)
        pidfile = pid_file(c, node0, "master")
        self._start(node0, argv, pidfile, log_file(c, node0, "master"), self._env(node0))

        def missing() -> list[int]:
            nodes = _health(shell, port).get("nodes")
            return list(range(1, len(c.nodes))) if not nodes else list(nodes["missing"])

        def wait() -> None:
            time.sleep(1.0)
            facts = probe_all(replace(c, nodes=(node0,)), with_logs=True)[0]
            if "error" not in facts and facts["pids"].get("master") is None:
                raise LaunchError(f"`edgetp serve` on {node0.name} exited; the end of its log:"
                                  f"\n{facts['logs']['log'][-1500:]}")

        self.wait_for_join(missing, wait, join_timeout_s)
        return f"http://127.0.0.1:{port}/v1 on {node0.name}"


def _health(shell: NodeShell, port: int) -> dict[str, Any]:
    command = f"{sh_path(shell.python)} -c {shlex.quote(HEALTH)} {port}"
    result = shell.run(command, timeout=30)
    try:
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {}


# -- stop and status ---------------------------------------------------------------------------

def stop_cluster(config: ClusterConfig, log: Log, workers_only: bool = False,
                 grace_s: float = 10.0) -> dict[str, dict[str, str]]:
    """Stop the processes the pid files name (workers, and node 0's detached master)."""
    with multiplexed(config):
        return _stop_cluster(config, log, workers_only, grace_s)


def _stop_cluster(config: ClusterConfig, log: Log, workers_only: bool,
                  grace_s: float) -> dict[str, dict[str, str]]:
    nodes = config.workers if workers_only else config.nodes

    def stop(node: NodeConfig) -> dict[str, str]:
        try:
            return dict(NodeShell(config, node).script(
                STOP, {"pidfiles": _roles(config, node), "grace": grace_s}, timeout=60))
        except LaunchError as exc:
            return {"error": str(exc)}

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(nodes)))) as pool:
        answers = dict(zip((n.name for n in nodes), pool.map(stop, nodes), strict=True))
    for name, answer in answers.items():
        for role, what in answer.items():
            if what != "not running":
                log(f"  {name}: {role} {what}")
    return answers


def cluster_status(config: ClusterConfig, rtt: bool = True) -> list[dict[str, Any]]:
    with multiplexed(config):
        return _cluster_status(config, rtt)


def _cluster_status(config: ClusterConfig, rtt: bool) -> list[dict[str, Any]]:
    facts = probe_all(config)
    rows = []
    for node in config.nodes:
        f = facts[node.rank]
        row: dict[str, Any] = {"rank": node.rank, "name": node.name,
                               "where": node.ssh or "this machine", "up": "error" not in f,
                               **f}
        row["running"] = {role: pid for role, pid in f.get("pids", {}).items() if pid}
        if row["up"] and rtt and not node.is_local:
            row["rtt_ms"] = echo_rtt_ms(NodeShell(config, node))
        rows.append(row)
    return rows


def render_status(config: ClusterConfig, rows: list[dict[str, Any]]) -> str:
    lines = [f"cluster {config.name}: master {config.master.url}", "",
             "| rank | node | via | up | python | edgetp | memory free | disk free | shard | "
             "running | ssh echo RTT |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["up"]:
            lines.append(f"| {r['rank']} | {r['name']} | {r['where']} | no: {r['error']} "
                         "| | | | | | | |")
            continue
        running = ", ".join(f"{k} {v}" for k, v in r["running"].items()) or "-"
        rtt = r.get("rtt_ms")
        lines.append(
            f"| {r['rank']} | {r['name']} | {r['where']} | yes | {r['python']} | "
            f"{r['edgetp'] or 'missing'} | {_gib(r.get('mem_available'))} of "
            f"{_gib(r.get('mem_total'))} | {_gib(r['disk_free'])} | "
            f"{'present' if r['shard_present'] else 'missing'} | {running} | "
            f"{'-' if rtt is None else f'{rtt:.2f} ms'} |")
    return "\n".join(lines)
