"""The model's split on this machine, and each node's ``rank-K/`` shipped to it.

:func:`prepare_split` splits the checkpoint once (cached), or takes the split the cluster file
points at. :func:`ship` makes a node's shard directory an exact copy of its local rank
directory: the node compares the manifest's sha256 of every file with its copy (re-hashing a
file only when its size or mtime changed), and only the files that differ are copied,
``manifest.json`` last. With rsync on both ends: ``rsync --partial-dir`` (an interrupted file
resumes); otherwise the files go through one ssh session into ``.NAME.part`` files, each
resuming from its partial size. Either way the node checks the sha256 before a file takes its
place (:func:`edgetp.ops.remote.check`, :func:`edgetp.ops.remote.receive`).

Only the files a split writes are shipped (:func:`edgetp.shard.layout.is_split_file`): a
manifest that names anything else (an absolute path, ``../``) is refused before a byte is read,
and the node refuses such a name too.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgetp.config.cluster import ClusterConfig
from edgetp.ops.launch.shell import LaunchError, NodeShell
from edgetp.shard.layout import is_split_file, rank_dir
from edgetp.shard.manifest import MANIFEST_NAME

CHUNK = 1 << 20
Log = Callable[[str], None]
Progress = Callable[[str, str, int, int], None]  # node, file, bytes done, bytes total
Files = dict[str, tuple[int, str]]  # file name -> (size, sha256)


def prepare_split(config: ClusterConfig, log: Log) -> Path:
    """The local split directory (rank-0 ... rank-N-1), splitting the checkpoint if needed."""
    from edgetp.shard.manifest import read_manifest

    model = config.local_path(config.model)
    if model.suffix.lower() == ".gguf" and model.is_file():  # converted once, cached
        from edgetp.shard.gguf_cache import model_dir_for

        model = model_dir_for(model, log=log)
    n = len(config.nodes)
    if (rank_dir(model, 0) / MANIFEST_NAME).is_file():
        plan = read_manifest(rank_dir(model, 0)).plan
        if plan.n_ranks != n or not _same_shares(plan.shares, config.shares):
            raise LaunchError(f"the split at {model} is for {plan.n_ranks} nodes with shares "
                              f"{list(plan.shares)}; the cluster has {n} with shares "
                              f"{list(config.shares)}: split again with `edgetp split MODEL "
                              f"--nodes {n}` or point `model` at the checkpoint")
        return model
    if not (model / "config.json").is_file():
        raise LaunchError(f"model {config.model!r} ({model}) is neither a checkpoint directory "
                          "(config.json), a .gguf file nor a split (rank-0/manifest.json); "
                          "launch needs one of them on this machine")
    from edgetp.runtime.local import split_cache_dir
    from edgetp.shard.split import split_checkpoint

    shares = None if len(set(config.shares)) == 1 else config.shares
    out = (config.local_path(config.split_dir) if config.split_dir else
           split_cache_dir(model, n, shares, None, config.private_layers))
    log(f"splitting {model} for {n} nodes into {out} (skipped if already done) ...")
    split_checkpoint(model, out, n, shares, private_layers=config.private_layers,
                     force=not config.split_dir)  # a stale split in the cache is replaced
    return out


def _same_shares(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    if len(a) != len(b):
        return False
    return all(abs(x / sum(a) - y / sum(b)) < 1e-6 for x, y in zip(a, b, strict=True))


def local_files(rank_dir: Path) -> Files:
    """Every file a split wrote into a rank directory: (size, sha256); manifest.json last.

    The manifest's files, and the other files a split writes that are there (rank 0's
    tokenizer files); a manifest naming a file a split does not write is refused.
    """
    from edgetp.shard.manifest import read_manifest

    listed = read_manifest(rank_dir).files
    strange = sorted(name for name in listed if not is_split_file(name))
    if strange:
        raise LaunchError(f"{rank_dir / MANIFEST_NAME} names {', '.join(map(repr, strange))}, "
                          "which no split writes (a rank directory holds layer-NNN.safetensors, "
                          "embed, head, tokenizer files and manifest.json only); launch refuses "
                          "to read or send it: split the model again with `edgetp split`")
    files = {name: (e.size, e.sha256) for name, e in listed.items()}
    for path in sorted(rank_dir.iterdir()):
        if path.is_file() and is_split_file(path.name) and path.name not in files:
            files[path.name] = (path.stat().st_size, _sha256(path))
    manifest = files.pop(MANIFEST_NAME)
    return {**files, MANIFEST_NAME: manifest}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(4 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    state = shell.remote("check", {"dir": dest, "files": expected})
    todo = {name: expected[name] for name in expected if state[name][0] != "ok"}
    label = "rsync --partial-dir" if method == "rsync" else "one ssh stream (resumable files)"
    result = ShipResult(shell.node.name, label, up_to_date=len(expected) - len(todo))
    if not todo:
        return result
    if method == "rsync":
        _rsync(shell, source, dest, list(todo), rsync_output)
        result.bytes_sent = sum(size for size, _ in todo.values())
        state = shell.remote("check", {"dir": dest, "files": todo})
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


def _stream(shell: NodeShell, source: Path, dest: str, todo: Files, offsets: dict[str, int],
            progress: Progress | None) -> dict[str, str]:
    """Send the files (each from its offset) through one ssh session into ``.NAME.part`` files
    that the node verifies (sha256) and moves into place; the node's answer per file."""
    args = {"dir": dest, "files": todo, "send": [[name, offsets[name]] for name in todo]}
    proc = subprocess.Popen(shell.argv(shell.remote_command("receive", args)),
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
