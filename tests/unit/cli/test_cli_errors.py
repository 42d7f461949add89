"""The command line: one line for a user's mistake, a traceback for a bug, a light --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from helpers.paths import REPO

from edgetp.cli.errors import EdgetpGroup
from edgetp.cli.main import main
from edgetp.core.errors import ClusterError, ConfigError, ShardError


@click.group(cls=EdgetpGroup)
def group() -> None:
    """A group like edgetp's, with commands that fail on purpose."""


@group.command()
@click.argument("kind")
def fail(kind: str) -> None:
    errors: dict[str, Exception] = {
        "config": ConfigError("c.yaml: nodes[1] (pi).threads must be >= 1, got 0"),
        "shard": ShardError("rank-1/manifest.json not found", fix="split the model again"),
        "cluster": ClusterError("rank 2 did not answer in 10 s"),
        "bug": ValueError("an index went wrong"),
    }
    raise errors[kind]


@pytest.mark.parametrize("kind, line", [
    ("config", "Error: c.yaml: nodes[1] (pi).threads must be >= 1, got 0"),
    ("shard", "Error: rank-1/manifest.json not found; split the model again"),
    ("cluster", "Error: rank 2 did not answer in 10 s")])
def test_an_edgetp_error_is_one_line_and_status_1(kind: str, line: str) -> None:
    result = CliRunner().invoke(group, ["fail", kind])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.strip().splitlines() == [line]


def test_any_other_exception_keeps_its_traceback() -> None:
    result = CliRunner().invoke(group, ["fail", "bug"])
    assert isinstance(result.exception, ValueError) and result.exc_info is not None
    with pytest.raises(ValueError, match="an index went wrong"):
        group.main(["fail", "bug"], standalone_mode=True)


def test_a_usage_error_keeps_status_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", str(tmp_path), str(tmp_path), str(tmp_path)])
    assert result.exit_code == 2 and "give one report directory" in result.output


def test_a_wrong_cluster_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("nodes: [{name: a, treads: 2}]\n")
    result = CliRunner().invoke(main, ["status", str(tmp_path / "c.yaml")])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Error: {tmp_path / 'c.yaml'}: 'model' is required (a HF checkpoint directory or a "
        "split directory with rank-0/ ... rank-N-1/)"]


def test_every_command_is_in_the_group() -> None:
    assert set(main.commands) == {
        "generate", "demo", "chat", "worker", "master", "keys", "serve", "launch", "status",
        "testbed", "split", "convert", "synth-split", "bench", "report", "plan", "probe"}
    assert "insecure" in {p.name for p in main.commands["worker"].params}


def test_help_is_instant_and_imports_no_torch() -> None:
    code = ("import sys; from edgetp.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"
    module = subprocess.run([sys.executable, "-m", "edgetp.cli", "--help"], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert module.returncode == 0 and "Commands:" in module.stdout
