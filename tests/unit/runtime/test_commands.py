"""The builder of node command lines against the real click commands: every combination of
options it can build parses with ``edgetp worker`` / ``edgetp serve``, and means what was asked.
A flag renamed in the CLI fails here."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest

from edgetp.cli import main as edgetp_group  # the `edgetp` command (the console script's target)
from edgetp.core.units import parse_bytes
from edgetp.runtime.commands import (
    MasterKeys,
    NodeCommand,
    ServeCommand,
    WorkerCommand,
    WorkerKeys,
    number_text,
    safe_module_argv,
    size_text,
)

SIZES = [None, 64 * 2**20, 3 * 2**30, 1_234_567]


def parse(args: list[str]) -> click.Context:
    """``edgetp ARGS`` parsed by the command ARGS[0] names, as the console script would."""
    assert isinstance(edgetp_group, click.Group)
    command = edgetp_group.commands[args[0]]
    parent = click.Context(edgetp_group, info_name="edgetp")
    return command.make_context(args[0], args[1:], parent=parent)


def choices(command: str, name: str) -> list[str]:
    """Every value the CLI accepts for a click.Choice option (so new ones are covered too)."""
    assert isinstance(edgetp_group, click.Group)
    option = next(p for p in edgetp_group.commands[command].params if p.name == name)
    assert isinstance(option.type, click.Choice)
    return [str(c) for c in option.type.choices]


def security_cases(keys: WorkerKeys | MasterKeys) -> list[dict[str, Any]]:
    return [{}, {"insecure": True}, {"keys": keys}]


def budget(params: dict[str, Any]) -> int | None:
    value = params["memory_budget"]
    return None if value is None else parse_bytes(value)


def worker_commands(shard: Path) -> list[WorkerCommand]:
    keys = WorkerKeys(shard.parent / "w.key_secret", shard.parent / "master.key")
    combos = itertools.product(security_cases(keys), [None, *choices("worker", "dtype")],
                               [None, 64], SIZES, [None, shard.parent / "frames"], [10.0, 2.5],
                               [None, 5601])
    return [WorkerCommand(shard, "tcp://10.0.0.1:5555", timeout, dtype, max_seq_len, size,
                          capture_frames=capture, data_port=data_port,
                          threads=None if data_port is None else 3, **security)
            for security, dtype, max_seq_len, size, capture, timeout, data_port in combos]


def test_every_worker_command_line_parses_and_means_what_was_asked(tmp_path: Path) -> None:
    shard = tmp_path / "rank-1"
    shard.mkdir()  # --shard must exist
    commands = worker_commands(shard)
    assert len(commands) == 3 * (1 + len(choices("worker", "dtype"))) * 2 * 4 * 2 * 2 * 2
    for command in commands:
        params = parse(command.args()).params
        keys = command.keys
        assert params["shard_dir"] == shard
        assert params["master_address"] == command.master
        assert params["timeout_s"] == command.timeout_s
        assert params["dtype"] == (command.dtype or "float32")
        assert params["max_seq_len"] == command.max_seq_len
        assert budget(params) == command.memory_budget
        assert params["key_file"] == (keys and Path(keys.secret))
        assert params["master_key_file"] == (keys and Path(keys.master_public))
        assert params["insecure"] == command.insecure
        assert params["capture_frames"] == (command.capture_frames and
                                            Path(command.capture_frames))
        assert params["data_port"] == command.data_port
        assert params["threads"] == command.threads


def serve_commands(shard: Path) -> list[ServeCommand]:
    keys = MasterKeys(shard / "master.key_secret", shard / "authorized")
    combos = itertools.product(security_cases(keys), [None, "0.0.0.0"], [None, 8123], SIZES[:3],
                               [None, *choices("serve", "wire_dtype")],
                               [None, *choices("serve", "allreduce")], [None, "Llama-3.2-1B"],
                               [10.0, 0.75])
    return [ServeCommand(shard, "tcp://0.0.0.0:5555", host, port, timeout_s=timeout,
                         memory_budget=size, wire_dtype=wire, allreduce=allreduce,
                         model_name=name, threads=None if name is None else 2, **security)
            for security, host, port, size, wire, allreduce, name, timeout in combos]


def test_every_serve_command_line_parses_and_means_what_was_asked(tmp_path: Path) -> None:
    commands = serve_commands(tmp_path)  # --shards must exist
    assert len(commands) == 3 * 2 * 2 * 3 * 4 * 3 * 2 * 2
    for command in commands:
        params = parse(command.args()).params
        keys = command.keys
        assert params["shard_dir"] == tmp_path and params["model_dir"] is None
        assert params["bind"] == command.bind
        assert params["host"] == (command.host or "127.0.0.1")
        assert params["port"] == (command.port or 8000)
        assert params["keys_file"] == (keys and Path(keys.secret))
        assert params["authorized"] == (keys and Path(keys.authorized))
        assert params["insecure"] == command.insecure
        assert params["timeout_s"] == command.timeout_s
        assert budget(params) == command.memory_budget
        assert params["wire_dtype"] == (command.wire_dtype or "f32")
        assert params["allreduce"] == (command.allreduce or "star")
        assert params["model_name"] == command.model_name
        assert params["threads"] == command.threads


def test_keys_and_insecure_do_not_go_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        WorkerCommand(tmp_path, "tcp://h:1", keys=WorkerKeys("s", "m"), insecure=True).args()
    with pytest.raises(ValueError, match="not both"):
        ServeCommand(tmp_path, "tcp://h:1", keys=MasterKeys("s", "a"), insecure=True).args()


def test_python_prefix_starts_the_command(tmp_path: Path) -> None:
    """``PYTHON -m edgetp.cli ARGS`` reaches the same command (here its --help, which exits 0)."""
    commands: list[NodeCommand] = [WorkerCommand(tmp_path, "tcp://127.0.0.1:1"),
                                   ServeCommand(tmp_path, "tcp://127.0.0.1:1")]
    for command in commands:
        argv = command.argv(sys.executable)
        assert argv[:3] == [sys.executable, "-m", "edgetp.cli"] and argv[3:] == command.args()
    argv = commands[0].argv(sys.executable) + ["--help"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(Path(__file__).resolve().parents[3]), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "Usage: python -m edgetp.cli worker" in result.stdout
    assert "--master-key" in result.stdout


def test_a_local_worker_is_told_its_master(tmp_path: Path) -> None:
    assert parse(WorkerCommand(tmp_path, "tcp://127.0.0.1:1", parent_pid=4321).args()
                 ).params["parent_pid"] == 4321
    assert parse(WorkerCommand(tmp_path, "tcp://127.0.0.1:1").args()).params["parent_pid"] is None


@pytest.mark.parametrize("version", [(3, 10), (3, 11)], ids=["bootstrap", "-P"])
def test_local_command_lines_ignore_an_edgetp_folder_in_the_cwd(tmp_path: Path,
                                                                version: tuple[int, int]) -> None:
    """A clone of the repository in the working directory would shadow edgetp under plain
    ``python -m``; both forms (-P from 3.11, the bootstrap before) keep it off the path, while
    PYTHONPATH still counts."""
    if sys.version_info[:2] < version:
        pytest.skip(f"needs Python {version[0]}.{version[1]}")
    (tmp_path / "edgetp").mkdir()
    (tmp_path / "edgetp" / "__init__.py").write_text("raise ImportError('shadowed')\n")
    argv = safe_module_argv(sys.executable, version) + ["worker", "--help"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(Path(__file__).resolve().parents[3]), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env,
                            cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    assert "--master-key" in result.stdout
    plain = subprocess.run([sys.executable, "-m", "edgetp.cli", "worker", "--help"],
                           capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
                           check=False)
    assert "shadowed" in plain.stderr  # what the safe forms avoid


def test_local_argv_is_this_interpreter(tmp_path: Path) -> None:
    command = WorkerCommand(tmp_path, "tcp://127.0.0.1:1")
    assert command.local_argv() == [*safe_module_argv(sys.executable), *command.args()]
    assert command.local_argv()[0] == sys.executable


@pytest.mark.parametrize("n", [1, 1023, 2**20, 5 * 2**20 + 1, 3 * 2**30, 7 * 2**30 + 2**20])
def test_sizes_read_back(n: int) -> None:
    assert parse_bytes(size_text(n)) == n


def test_sizes_and_numbers_are_written_short() -> None:
    assert [size_text(n) for n in (256 * 2**20, 2 * 2**30, 1000)] == ["256MiB", "2GiB", "1000"]
    assert [number_text(x) for x in (10.0, 2.5, 300.0)] == ["10", "2.5", "300"]
    assert float(number_text(1234567.125)) == 1234567.125
