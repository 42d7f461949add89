"""The parts of edgetp.ops.launch that need no ssh: node shells (the commands they build, the
node helper run through ``sh`` here), the checks of the nodes' facts, the status table, and
the launcher's command lines."""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edgetp import __version__
from edgetp.config.cluster import ClusterConfig, parse_cluster_config
from edgetp.ops.launch import Launcher, LaunchError, render_status
from edgetp.ops.launch.layout import keys_dir, log_file, pid_file, pid_files
from edgetp.ops.launch.nodes import check_disks, check_nodes
from edgetp.ops.launch.shell import NodeShell, sh_path
from edgetp.ops.launch.shipping import ShipResult


def cluster(tmp_path: Path, **extra: Any) -> ClusterConfig:
    nodes = [{"name": "here", "address": "127.0.0.1", "shard_dir": str(tmp_path / "rank-0")},
             {"name": "pi", "address": "10.0.0.2", "ssh": "me@pi.local:2222",
              "python": "~/venv/bin/python", "shard_dir": "~/shards/rank-1",
              "cache_dir": "~/.cache/edgetp/", "memory_budget": "512MiB"}]
    data = {"name": "home", "model": str(tmp_path / "model"), "master": {"address": "10.0.0.1"},
            "nodes": nodes, "ssh_options": ["-i", "~/.ssh/id_home"], **extra}
    return parse_cluster_config(data, "test", tmp_path)


def test_paths_for_the_node_shell() -> None:
    assert sh_path("~") == '"$HOME"'
    assert sh_path("~/a b/c") == '"$HOME"/' + shlex.quote("a b/c")
    assert sh_path("/opt/x y") == "'/opt/x y'"


def test_commands_over_ssh(tmp_path: Path) -> None:
    config = cluster(tmp_path)
    shell = NodeShell(config, config.nodes[1])
    argv = shell.argv("echo hi")
    assert argv[0] == "ssh" and "BatchMode=yes" in argv
    assert argv[argv.index("-i") + 1] == str(Path.home() / ".ssh" / "id_home")
    assert argv[argv.index("-p") + 1] == "2222"
    assert argv[-3:] == ["--", "me@pi.local", "sh -c 'echo hi'"]  # "--": never an option
    command = shell.remote_command("facts", {"shard_dir": "~/s"})
    words = shlex.split(command)
    assert command.startswith('"$HOME"/venv/bin/python -c ')
    assert words[2].startswith('"""The node side of ``edgetp launch``')
    assert words[3:] == ["facts", '{"shard_dir": "~/s"}']


def test_the_node_helper_through_sh_on_this_machine(tmp_path: Path) -> None:
    config = cluster(tmp_path)
    shell = NodeShell(config, config.nodes[0])
    assert shell.argv("true") == ["sh", "-c", "true"] and shell.python == sys.executable
    (tmp_path / "rank-0").mkdir()
    facts = shell.remote("facts", {"shard_dir": str(tmp_path / "rank-0"),
                                   "pidfiles": pid_files(config, config.nodes[0])})
    assert facts["edgetp"] == __version__ and facts["pids"] == {"master": None}
    with pytest.raises(LaunchError, match=r"node 0 \(here, this machine\): .*invalid choice"):
        shell.remote("no-such-command", {})


def failed(code: int, err: str) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess([], code, "", err)


def test_failures_say_what_to_fix(tmp_path: Path) -> None:
    config = cluster(tmp_path)
    shell = NodeShell(config, config.nodes[1])
    assert "works without a password prompt" in shell.failure(failed(255, "Permission denied"))
    assert "set `python:` for this node" in shell.failure(failed(127, "sh: not found"))
    assert shell.failure(failed(1, "one\nTraceback: last line")) == "Traceback: last line"
    assert shell.failure(failed(3, "")) == "exit status 3"


def test_where_launch_keeps_things_on_a_node(tmp_path: Path) -> None:
    config = cluster(tmp_path)
    pi = config.nodes[1]
    assert log_file(config, pi) == "~/.cache/edgetp/logs/home-pi.log"
    assert pid_file(config, pi) == "~/.cache/edgetp/run/home-pi.pid"
    assert keys_dir(pi) == "~/.cache/edgetp/keys"
    assert pid_files(config, config.nodes[0]) == {"master": "~/.cache/edgetp/run/home-master.pid"}
    assert pid_files(config, pi) == {"worker": "~/.cache/edgetp/run/home-pi.pid"}


def facts(**changes: Any) -> dict[str, Any]:
    return {"python": "3.11.2", "edgetp": __version__, "mem_total": 8 * 2**30,
            "mem_available": 6 * 2**30, "disk_free": 50 * 2**30, "rsync": True,
            "shard_present": True, **changes}


def test_check_nodes_lists_every_problem_and_logs_warnings(tmp_path: Path) -> None:
    config = cluster(tmp_path)
    lines: list[str] = []
    check_nodes(config, {0: facts(), 1: facts(edgetp="0.0.1", mem_available=2**20)},
                lines.append)
    assert any("pi" in line and "python 3.11.2" in line and "rsync" in line for line in lines)
    assert any("runs edgetp 0.0.1" in line for line in lines)
    assert any("less than its memory_budget 0.5 GiB" in line for line in lines)

    with pytest.raises(LaunchError) as problems:
        check_nodes(config, {0: facts(python="3.8.10"), 1: facts(edgetp=None)}, lines.append)
    assert "node 0 (here): Python 3.8.10 is too old" in str(problems.value)
    assert "node 1 (pi): edgetp is not installed for ~/venv/bin/python" in str(problems.value)
    with pytest.raises(LaunchError, match="cannot ssh"):
        check_nodes(config, {0: facts(), 1: {"error": "node 1: cannot ssh"}}, lines.append)


def test_check_disks_wants_room_for_a_missing_shard(tmp_path: Path) -> None:
    config = cluster(tmp_path)
    small = {0: facts(), 1: facts(shard_present=False, disk_free=2**30)}
    check_disks(config, small, {0: 10 * 2**30, 1: 2**29})
    with pytest.raises(LaunchError, match=r"node 1 \(pi\): 1.0 GiB free disk for a 2.0 GiB"):
        check_disks(config, small, {0: 10 * 2**30, 1: 2 * 2**30})


def test_status_table(tmp_path: Path) -> None:
    config = cluster(tmp_path)
    rows = [{"rank": 0, "name": "here", "where": "this machine", "up": True, **facts(),
             "running": {}, "rtt_ms": None},
            {"rank": 1, "name": "pi", "where": "me@pi.local:2222", "up": False,
             "error": "no route"}]
    table = render_status(config, rows).splitlines()
    assert table[0] == "cluster home: master tcp://10.0.0.1:5555"
    assert table[4].startswith("| 0 | here | this machine | yes | 3.11.2 | 0.1.0 | 6.0 GiB of")
    assert table[4].endswith("| present | - | - |")
    assert table[5] == "| 1 | pi | me@pi.local:2222 | no: no route | | | | | | | |"


def test_ship_results_describe_themselves() -> None:
    assert ShipResult("pi", "rsync --partial-dir", up_to_date=5).describe() == \
        "pi: all 5 files up to date"
    result = ShipResult("pi", "rsync --partial-dir", ["a", "b"], 3 * 2**20, 3)
    assert result.describe() == ("pi: copied 2 file(s), 3.0 MiB with rsync --partial-dir "
                                 "(3 already up to date)")


def test_launcher_command_lines(tmp_path: Path) -> None:
    config = cluster(tmp_path)
    worker = Launcher(config).worker_argv(config.nodes[1])
    assert worker[:4] == ["~/venv/bin/python", "-m", "edgetp.cli", "worker"]
    assert worker[worker.index("--shard") + 1] == "~/shards/rank-1"
    assert worker[worker.index("--memory-budget") + 1] == "512MiB"
    assert "--insecure" in worker and "--key" not in worker and "--data-port" not in worker
    fixed = replace(config.nodes[1], data_port=5601)  # the node's data_port: in the file
    assert Launcher(config).worker_argv(fixed)[-2:] == ["--data-port", "5601"]
    serve = Launcher(config).serve_argv(8080)
    assert serve[:4] == [sys.executable, "-m", "edgetp.cli", "serve"]
    assert serve[serve.index("--shards") + 1] == str(tmp_path / "rank-0")
    assert serve[serve.index("--port") + 1] == "8080" and "--insecure" in serve
    assert serve[serve.index("--model-name") + 1] == "model"

    curve = cluster(tmp_path, security={"curve": True, "keys_dir": "keys"})
    worker = Launcher(curve).worker_argv(curve.nodes[1])
    assert worker[worker.index("--key") + 1] == "~/.cache/edgetp/keys/pi.key_secret"
    assert worker[worker.index("--master-key") + 1] == "~/.cache/edgetp/keys/master.key"
    serve = Launcher(curve).serve_argv(8080)
    assert serve[serve.index("--keys") + 1] == str(tmp_path / "keys" / "master.key_secret")
    assert serve[serve.index("--authorized") + 1] == str(tmp_path / "keys" / "authorized")
    assert "--insecure" not in worker + serve
