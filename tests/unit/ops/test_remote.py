"""The node side of launch (edgetp.ops.remote): each command on real files and processes, the
command line, and the module run the two ways it runs (``python -m`` and its text sent as
``python -c`` to a Python without edgetp)."""

from __future__ import annotations

import ast
import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.paths import REPO

from edgetp import __version__
from edgetp.ops import remote

# shard files by the part they play (the helper handles only the names a split writes)
SAME, CHANGED, SHORT, MISSING = (f"layer-00{i}.safetensors" for i in range(4))
WHOLE, RESUMED, CORRUPT, CUT = "embed.safetensors", "head.safetensors", "config.json", \
    "tokenizer.json"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_check_reports_each_state_and_rehashes_only_changed_files(tmp_path: Path) -> None:
    good, other = b"a" * 1000, b"b" * 1000
    (tmp_path / SAME).write_bytes(good)
    (tmp_path / CHANGED).write_bytes(other)  # same size, other content
    (tmp_path / SHORT).write_bytes(good[:10])
    (tmp_path / f".{MISSING}.part").write_bytes(good[:300])
    files = {name: [len(good), digest(good)] for name in (SAME, CHANGED, SHORT, MISSING)}
    assert remote.check({"dir": str(tmp_path), "files": files}) == {
        SAME: ["ok", 0], CHANGED: ["sha256", 0], SHORT: ["size", 0],
        MISSING: ["missing", 300]}

    # the digest is remembered by (size, mtime): content changed behind its back goes unseen ...
    stat = (tmp_path / SAME).stat()
    (tmp_path / SAME).write_bytes(other)
    os.utime(tmp_path / SAME, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert remote.check({"dir": str(tmp_path), "files": files})[SAME] == ["ok", 0]
    # ... until the mtime changes
    os.utime(tmp_path / SAME, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert remote.check({"dir": str(tmp_path), "files": files})[SAME] == ["sha256", 0]
    assert json.loads((tmp_path / remote.VERIFIED).read_text())[SAME][2] == digest(other)


def test_receive_resumes_checks_and_moves_files_into_place(tmp_path: Path) -> None:
    whole, resumed, corrupt, cut = b"w" * 5000, b"r" * 4000, b"c" * 3000, b"x" * 2000
    (tmp_path / f".{RESUMED}.part").write_bytes(resumed[:1500])
    files = {WHOLE: [5000, digest(whole)], RESUMED: [4000, digest(resumed)],
             CORRUPT: [3000, digest(corrupt)], CUT: [2000, digest(cut)]}
    stream = io.BytesIO(whole + resumed[1500:] + b"C" * 3000 + cut[:500])
    send = [[WHOLE, 0], [RESUMED, 1500], [CORRUPT, 0], [CUT, 0]]
    answer = remote.receive({"dir": str(tmp_path), "files": files, "send": send}, stream)
    assert answer == {WHOLE: "ok", RESUMED: "ok",
                      CORRUPT: "bad copy (size or sha256 differ); it will be sent again",
                      CUT: "incomplete; launch again to resume"}
    assert (tmp_path / WHOLE).read_bytes() == whole
    assert (tmp_path / RESUMED).read_bytes() == resumed
    assert not (tmp_path / CORRUPT).exists() and not (tmp_path / f".{CORRUPT}.part").exists()
    assert (tmp_path / f".{CUT}.part").read_bytes() == cut[:500]  # kept: the next launch resumes


SLEEPER = "import time; print('edgetp test sleeper', flush=True); time.sleep(60)"


def test_start_facts_and_stop_a_detached_process(tmp_path: Path) -> None:
    cache, log, pidfile = tmp_path / "cache", tmp_path / "cache" / "logs" / "t.log", \
        tmp_path / "cache" / "run" / "t.pid"
    args = {"cache": str(cache), "argv": [sys.executable, "-c", SLEEPER], "env": {"X": "1"},
            "log": str(log), "pidfile": str(pidfile), "settle": 0.3}
    started = remote.start(args)
    pid = started["pid"]
    try:
        assert started["exited"] is None and started["tail"] == ""
        assert int(pidfile.read_text()) == pid and remote.alive(pid)
        assert "edgetp launch: " + sys.executable in log.read_text()
        facts = remote.facts({"shard_dir": str(tmp_path / "no" / "such" / "dir"),
                              "pidfiles": {"worker": str(pidfile), "gone": str(tmp_path / "x")},
                              "logs": {"log": str(log)}})
        assert facts["pids"] == {"worker": pid, "gone": None}
        assert facts["python"] == ".".join(map(str, sys.version_info[:3]))
        assert facts["edgetp"] == __version__ and facts["disk_free"] > 0
        assert not facts["shard_present"] and facts["mem_total"] > 0
        assert "edgetp launch" in facts["logs"]["log"]
    finally:
        stopped = remote.stop({"pidfiles": {"worker": str(pidfile)}, "grace": 5})
    assert stopped == {"worker": f"stopped pid {pid}"}
    assert not remote.alive(pid) and not pidfile.exists()
    assert remote.stop({"pidfiles": {"worker": str(pidfile)}, "grace": 5}) == {
        "worker": "not running"}


def test_a_process_that_exits_at_once_is_reported_with_its_log(tmp_path: Path) -> None:
    args = {"cache": str(tmp_path), "argv": [sys.executable, "-c", "raise SystemExit('nope')"],
            "env": {}, "log": str(tmp_path / "x.log"), "pidfile": str(tmp_path / "x.pid"),
            "settle": 1.0}
    answer = remote.start(args)
    assert answer["exited"] == 1 and "nope" in answer["tail"]


def test_only_edgetp_processes_count_as_alive(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert not remote.alive(proc.pid)  # running, but not edgetp: never stopped by launch
        (tmp_path / "p.pid").write_text(str(proc.pid))
        assert remote.pid_of(str(tmp_path / "p.pid")) is None
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def health_server() -> Iterator[int]:
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = json.dumps({"nodes": {"missing": [2]}}).encode()
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_health_answers_or_says_why_not(health_server: int) -> None:
    assert remote.health({"port": health_server}) == {"nodes": {"missing": [2]}}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert "error" in remote.health({"port": closed})


def test_echo_and_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    sink = io.StringIO()
    remote.echo(io.StringIO("one\ntwo\n"), sink)
    assert sink.getvalue() == "one\ntwo\n"
    files = {SAME: [3, digest(b"abc")]}
    (tmp_path / SAME).write_bytes(b"abc")
    assert remote.main(["check", json.dumps({"dir": str(tmp_path), "files": files})]) == 0
    assert json.loads(capsys.readouterr().out) == {SAME: ["ok", 0]}
    with pytest.raises(SystemExit):
        remote.main(["nonsense"])


def run_node_helper(argv: list[str], args: dict[str, object], cwd: Path,
                    env: dict[str, str] | None = None) -> dict[str, object]:
    result = subprocess.run([*argv, "facts", json.dumps(args)], capture_output=True, text=True,
                            timeout=60, cwd=cwd, env=env, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1  # one line of JSON
    return dict(json.loads(lines[0]))


def test_runs_as_a_module_and_as_text_on_a_python_without_edgetp(tmp_path: Path) -> None:
    (tmp_path / "shard").mkdir()
    (tmp_path / "shard" / "manifest.json").write_text("{}")
    args = {"shard_dir": str(tmp_path / "shard")}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    as_module = run_node_helper([sys.executable, "-m", "edgetp.ops.remote"], args, tmp_path, env)
    assert as_module["edgetp"] == __version__ and as_module["shard_present"] is True

    # how launch runs it: the text, on an interpreter that cannot import edgetp (-I -S: no
    # PYTHONPATH, no site-packages, no current directory)
    source = Path(remote.__file__).read_text()
    as_text = run_node_helper([sys.executable, "-I", "-S", "-c", source], args, tmp_path)
    assert as_text["edgetp"] is None and "edgetp" in str(as_text["edgetp_error"])
    assert as_text["shard_present"] is True and as_text["python"] == as_module["python"]


def test_standard_library_only_and_python_37_syntax() -> None:
    """A node with an old Python, or without edgetp, must still answer ``facts``."""
    tree = ast.parse(Path(remote.__file__).read_text(), feature_version=(3, 7))
    optional = {"edgetp", "psutil"}  # imported inside try: what the node has is reported
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            root = name.split(".")[0]
            assert root in sys.stdlib_module_names or root == "__future__" or (
                root in optional and node not in tree.body), f"imports {name}"


OUTSIDE_NAMES = ["../escape.safetensors", "../../layer-000.safetensors",
                 "sub/layer-000.safetensors", "/etc/passwd", ".hidden", "notes.txt",
                 "layer-000.safetensors/..", "", ".", None]


@pytest.mark.parametrize("name", OUTSIDE_NAMES)
def test_names_a_split_does_not_write_are_refused(tmp_path: Path, name: str | None) -> None:
    """A file name that is a path, or not one a split writes, is neither read nor written."""
    shard = tmp_path / "a" / "b" / "shard"
    files = {name: [3, digest(b"abc")]}
    with pytest.raises(remote.Refused, match="refusing the file name"):
        remote.check({"dir": str(shard), "files": files})
    with pytest.raises(remote.Refused, match="refusing the file name"):
        remote.receive({"dir": str(shard), "files": files, "send": [[name, 0]]},
                       io.BytesIO(b"abc"))
    assert not (tmp_path / "a" / "escape.safetensors").exists()
    assert not list(tmp_path.rglob("*.part")) and not list(tmp_path.rglob(remote.VERIFIED))


def test_a_refusal_is_one_line_and_its_own_exit_status(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    args = {"dir": str(tmp_path / "shard"), "files": {"../../x": [1, digest(b"x")]}}
    assert remote.main(["check", json.dumps(args)]) == remote.EXIT_REFUSED
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "refusing the file name '../../x'" in captured.err


def test_the_helper_knows_the_names_the_layout_knows() -> None:
    """remote.py cannot import edgetp on a node: its copy of the names must stay equal."""
    from edgetp.shard import layout

    assert remote.SPLIT_FILE.pattern == layout.SPLIT_FILE.pattern
