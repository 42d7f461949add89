"""The node side of ``edgetp launch``: what runs on a node, answering with one line of JSON.

``python -m edgetp.ops.remote COMMAND [JSON]`` (or this file's text given to ``python -c``,
which is how launch runs it over ssh, see below) with one command:

* ``facts``: Python and edgetp versions, free memory and disk, whether the shard is there,
  rsync, the processes the pid files name (and the ends of logs, if asked);
* ``check``: the state of each file of a shard against its (size, sha256): ``ok``,
  ``missing``, ``size`` or ``sha256``, with the size of a partial ``.NAME.part`` copy. Digests
  are remembered in ``.edgetp-verified.json`` by (size, mtime): a file is hashed again only
  when it changed;
* ``receive``: files on standard input (each from an offset to its end) appended to
  ``.NAME.part`` files, each checked (size, sha256) before it takes its place;
* ``start``: a process detached (``nohup``, its own session), output appended to a log, its
  pid in a pid file; reports whether it exited within ``settle`` seconds, with its log;
* ``stop``: the processes the pid files name (edgetp ones only): SIGTERM, SIGKILL after
  ``grace`` seconds;
* ``health``: ``GET /health`` of the API on this node's loopback;
* ``echo``: copies standard input to standard output line by line (the ssh round trip).

The node may not have edgetp installed, or another version of it: finding that out is the
``facts`` command's job. So launch does not import this module on the node: it sends its text
(``python -c TEXT COMMAND JSON``), and this module uses the standard library only and the
Python 3.7 syntax, so that even a node with an old Python answers with its version.
(tests/unit/ops/test_remote.py holds it to that.)

``check`` and ``receive`` touch only the files a split writes, in the shard directory itself:
a name that is anything else (a path, ``../``, an absolute name, a file no split writes) is
refused (:class:`Refused`: one line on standard error, exit status 2), whoever asks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import IO, Any

P = os.path.expanduser
SHA_BLOCK = 1 << 22
RECEIVE_BLOCK = 1 << 20
VERIFIED = ".edgetp-verified.json"  # per shard directory: name -> [size, mtime_ns, sha256]
# the names of the files a split writes (a copy of edgetp.shard.layout.SPLIT_FILE, which this
# module cannot import on a node without edgetp; tests/unit/ops/test_remote.py keeps it equal)
SPLIT_FILE = re.compile(r"layer-[0-9]{3,}\.safetensors|manifest\.json|embed\.safetensors|"
                        r"head\.safetensors|tokenizer\.json|tokenizer_config\.json|"
                        r"generation_config\.json|chat_template\.jinja|config\.json")
EXIT_REFUSED = 2


class Refused(Exception):
    """A request this helper will not carry out; the message says why."""


# -- processes ---------------------------------------------------------------------------------

def cmdline(pid: int) -> str:
    """The command line of ``pid`` (/proc, else ``ps``), arguments joined by spaces."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        r = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True,
                           text=True)
        return r.stdout


def alive(pid: int) -> bool:
    """``pid`` runs (not a zombie) and is an edgetp process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except OSError:
        pass
    return "edgetp" in cmdline(pid)


def pid_of(pidfile: str) -> int | None:
    """The pid a pid file names, if that process is alive; else None."""
    try:
        with open(P(pidfile)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def tail(path: str, n: int = 3000) -> str:
    """The last ``n`` bytes of a file as text; empty if it cannot be read."""
    try:
        with open(P(path), "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(SHA_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


# -- facts -------------------------------------------------------------------------------------

def memory() -> dict[str, int]:
    """MemTotal and MemAvailable in bytes (/proc/meminfo, else psutil, else nothing)."""
    mem = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                mem[key] = int(value.split()[0]) * 1024
    except OSError:
        try:
            import psutil

            vm = psutil.virtual_memory()
            mem = {"MemTotal": vm.total, "MemAvailable": vm.available}
        except Exception:  # noqa: BLE001 - no psutil: memory unknown
            pass
    return mem


def disk_free(directory: str) -> int:
    """Free bytes on the file system ``directory`` is (or would be) on."""
    path = os.path.abspath(directory)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def facts(args: dict[str, Any]) -> dict[str, Any]:
    """args: shard_dir, pidfiles {role: path}, logs {name: path} (optional)."""
    out: dict[str, Any] = {"python": platform.python_version(), "host": platform.node(),
                           "edgetp": None}
    try:
        import edgetp

        out["edgetp"] = edgetp.__version__
    except Exception as e:  # noqa: BLE001 - not installed, or broken: both are reported
        out["edgetp_error"] = repr(e)
    mem = memory()
    out["mem_total"], out["mem_available"] = mem.get("MemTotal"), mem.get("MemAvailable")
    shard_dir = P(args["shard_dir"])
    out["disk_free"] = disk_free(shard_dir)
    out["shard_present"] = os.path.isfile(os.path.join(shard_dir, "manifest.json"))
    out["rsync"] = shutil.which("rsync") is not None
    out["pids"] = {k: pid_of(v) for k, v in args.get("pidfiles", {}).items()}
    out["logs"] = {k: tail(v) for k, v in args.get("logs", {}).items()}
    return out


# -- shards ------------------------------------------------------------------------------------

def shard_file(directory: str, name: Any) -> str:
    """The path of the shard file ``name`` in ``directory``; :class:`Refused` unless ``name``
    is a file a split writes (so nothing outside the directory is ever read or written)."""
    if not isinstance(name, str) or not SPLIT_FILE.fullmatch(name):
        raise Refused(f"refusing the file name {name!r}: a shard directory holds only the "
                      "files a split writes (layer-NNN.safetensors, embed.safetensors, "
                      "head.safetensors, tokenizer files, manifest.json)")
    return os.path.join(directory, name)


def part_path(directory: str, name: str) -> str:
    """Where a copy of ``name`` grows until it is checked: ``.NAME.part``."""
    shard_file(directory, name)
    return os.path.join(directory, "." + name + ".part")


def _read_verified(path: str) -> dict[str, list[Any]]:
    try:
        with open(path) as f:
            return dict(json.load(f))
    except (OSError, ValueError):
        return {}


def check(args: dict[str, Any]) -> dict[str, list[Any]]:
    """args: dir, files {name: [size, sha256]}. Per file: [state, bytes of its .part copy]."""
    directory = P(args["dir"])
    for name in args["files"]:
        shard_file(directory, name)  # every name checked before anything is touched
    os.makedirs(directory, exist_ok=True)
    verified_path = os.path.join(directory, VERIFIED)
    verified = _read_verified(verified_path)
    out: dict[str, list[Any]] = {}
    for name, (size, digest) in args["files"].items():
        path, part = shard_file(directory, name), part_path(directory, name)
        partial = os.path.getsize(part) if os.path.isfile(part) else 0
        try:
            st = os.stat(path)
        except OSError:
            out[name] = ["missing", partial]
            continue
        if st.st_size != size:
            out[name] = ["size", partial]
            continue
        key = [st.st_size, st.st_mtime_ns]
        got = verified[name][2] if verified.get(name, [None])[:2] == key else sha256_of(path)
        verified[name] = key + [got]
        out[name] = ["ok" if got == digest else "sha256", partial]
    with open(verified_path + ".tmp", "w") as f:
        json.dump(verified, f)
    os.replace(verified_path + ".tmp", verified_path)
    return out


def _append(stream: IO[bytes], part: str, offset: int, size: int) -> None:
    """Bytes ``offset`` to ``size`` of a file from ``stream`` onto its .part (cut short: left)."""
    with open(part, "ab" if offset else "wb") as f:
        left = size - offset
        while left:
            block = stream.read(min(left, RECEIVE_BLOCK))
            if not block:
                break
            f.write(block)
            left -= len(block)


def receive(args: dict[str, Any], stream: IO[bytes]) -> dict[str, str]:
    """args: dir, files {name: [size, sha256]}, send [[name, offset], ...] in stream order.

    Every file of ``files`` is then checked and moved into place, in order (manifest last).
    """
    directory = P(args["dir"])
    for name in list(args["files"]) + [name for name, _ in args["send"]]:
        shard_file(directory, name)  # every name checked before anything is written
    os.makedirs(directory, exist_ok=True)
    for name, offset in args["send"]:
        _append(stream, part_path(directory, name), offset, args["files"][name][0])
    out = {}
    for name, (size, digest) in args["files"].items():
        part = part_path(directory, name)
        if not os.path.isfile(part) or os.path.getsize(part) < size:
            out[name] = "incomplete; launch again to resume"
        elif os.path.getsize(part) > size or sha256_of(part) != digest:
            out[name] = "bad copy (size or sha256 differ); it will be sent again"
            os.remove(part)
        else:
            os.replace(part, shard_file(directory, name))
            out[name] = "ok"
    return out


# -- starting and stopping ---------------------------------------------------------------------

def start(args: dict[str, Any]) -> dict[str, Any]:
    """args: cache, argv, env, log, pidfile, settle. The process's pid and, if it already
    exited, its status and the end of its log."""
    for sub in ("logs", "run"):
        os.makedirs(os.path.join(P(args["cache"]), sub), exist_ok=True)
    argv = [P(args["argv"][0])] + args["argv"][1:]
    env = dict(os.environ, **args["env"])
    with open(P(args["log"]), "ab") as f:
        f.write(f"=== {time.strftime('%F %T')} edgetp launch: {' '.join(argv)}\n".encode())
        f.flush()
        p = subprocess.Popen(["nohup"] + argv, stdin=subprocess.DEVNULL, stdout=f,
                             stderr=subprocess.STDOUT, env=env, start_new_session=True,
                             cwd=P("~"))
    with open(P(args["pidfile"]), "w") as f:
        f.write(str(p.pid))
    time.sleep(args["settle"])
    code = p.poll()
    return {"pid": p.pid, "exited": code, "tail": "" if code is None else tail(args["log"])}


def stop_process(pid: int, grace_s: float) -> None:
    """SIGTERM, then SIGKILL if it still runs after ``grace_s``."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    while alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def stop(args: dict[str, Any]) -> dict[str, str]:
    """args: pidfiles {role: path}, grace. Per role what was done; the pid files are removed."""
    out = {}
    for name, pidfile in args["pidfiles"].items():
        pid = pid_of(pidfile)
        if pid is None:
            out[name] = "not running"
        else:
            stop_process(pid, args["grace"])
            out[name] = f"stopped pid {pid}"
        if os.path.exists(P(pidfile)):
            os.remove(P(pidfile))
    return out


# -- the API and the link ----------------------------------------------------------------------

def health(args: dict[str, Any]) -> dict[str, Any]:
    """args: port. The answer of http://127.0.0.1:PORT/health, or {"error": ...}."""
    import urllib.request  # here: the other commands do without its imports (ssl, http)

    url = f"http://127.0.0.1:{int(args['port'])}/health"
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return dict(json.loads(r.read().decode()))
    except Exception as e:  # noqa: BLE001 - not up yet, or not edgetp: the caller waits
        return {"error": repr(e)}


def echo(source: IO[str], sink: IO[str]) -> None:
    """Every line of ``source`` written back at once (run with ``python -u``)."""
    for line in source:
        sink.write(line)
        sink.flush()


# -- command line ------------------------------------------------------------------------------

ANSWERS = {"facts": facts, "check": check, "start": start, "stop": stop, "health": health}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgetp.ops.remote",
                                     description="the node side of edgetp launch")
    parser.add_argument("command", choices=[*ANSWERS, "receive", "echo"])
    parser.add_argument("args", nargs="?", default="{}", help="the command's JSON arguments")
    options = parser.parse_args(argv)
    if options.command == "echo":
        echo(sys.stdin, sys.stdout)
        return 0
    args = json.loads(options.args)
    try:
        if options.command == "receive":
            answer: Any = receive(args, sys.stdin.buffer)
        else:
            answer = ANSWERS[options.command](args)
    except Refused as e:
        sys.stderr.write(f"edgetp node helper: {e}\n")
        return EXIT_REFUSED
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
