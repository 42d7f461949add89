"""The test harness itself: whatever a test starts ends with it, and its temporary directories
go, when it passes, fails or times out (tests/conftest.py, tests/helpers/processes.py).

The fixtures are proved from outside: a small pytest run in a subprocess, with this
repository's conftest.py and pyproject.toml, whose tests start a process group with a
grandchild and an orphan that leaves the process tree; one passes (and sets an environment
variable the next test must not see), one fails, one hangs until pytest-timeout fails it.
Afterwards none of their processes or directories may be left.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import processes
from helpers.paths import REPO

INNER_TIMEOUT_S = 5
INNER_TESTS = f'''
import os, subprocess, tempfile, time
from pathlib import Path

import pytest
from helpers.processes import spawn

NOTES = Path(os.environ["HARNESS_NOTES"])


def note(*words):
    with NOTES.open("a") as notes:
        notes.write(" ".join(map(str, words)) + "\\n")


def start_processes(test, tmp_path):
    """A spawned group (sh and its sleeping child), and a process the code under test starts
    that leaves the process tree (setsid, its parent exits)."""
    spawn(["sh", "-c", 'sleep 300 & echo "$0 pid $!" >> "$1"; echo "$0 pid $$" >> "$1"; wait',
           test, str(NOTES)])
    subprocess.run(["sh", "-c", 'setsid sleep 300 < /dev/null > /dev/null 2>&1 & '
                    'echo "$0 pid $!" >> "$1"', test, str(NOTES)], check=True)
    while NOTES.read_text().count(test + " pid ") < 3:
        time.sleep(0.01)
    note(test, "dir", tmp_path)
    note(test, "dir", tempfile.gettempdir())


def test_passes(tmp_path):
    start_processes("passes", tmp_path)
    os.environ["HARNESS_LEFT_BEHIND"] = "1"


def test_the_environment_is_back():
    assert "HARNESS_LEFT_BEHIND" not in os.environ


def test_fails(tmp_path):
    start_processes("fails", tmp_path)
    assert False, "this test fails"


@pytest.mark.timeout({INNER_TIMEOUT_S})
def test_hangs(tmp_path):
    start_processes("hangs", tmp_path)
    time.sleep(300)
'''


def read_notes(path: Path) -> dict[str, dict[str, list[str]]]:
    """test -> {"pid": [...], "dir": [...]}."""
    notes: dict[str, dict[str, list[str]]] = {}
    for line in path.read_text().splitlines():
        test, kind, value = line.split(" ", 2)
        notes.setdefault(test, {"pid": [], "dir": []})[kind].append(value)
    return notes


def test_processes_and_temp_dirs_end_with_the_test_also_on_failure_and_timeout(
        tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    shutil.copy(REPO / "tests" / "conftest.py", inner / "conftest.py")
    shutil.copy(REPO / "pyproject.toml", inner / "pyproject.toml")
    (inner / "test_inner.py").write_text(INNER_TESTS)
    notes_path = tmp_path / "notes"
    notes_path.touch()
    env = {**os.environ, "HARNESS_NOTES": str(notes_path),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    started = time.monotonic()
    try:
        result = processes.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                                f"--basetemp={tmp_path / 'basetemp'}", "test_inner.py"],
                               cwd=inner, env=env, capture_output=True, text=True, timeout=240)
        notes = read_notes(notes_path)
        pids = [int(pid) for test in notes.values() for pid in test["pid"]]
        survivors = [pid for pid in pids if processes.alive(pid)]
    finally:
        for pid in [int(w) for w in notes_path.read_text().split() if w.isdigit()]:
            if processes.alive(pid):
                os.kill(pid, signal.SIGKILL)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "2 failed, 2 passed" in output, output
    assert f"Timeout (>{INNER_TIMEOUT_S}.0s) from pytest-timeout" in output, output
    assert time.monotonic() - started < 200, "the hung test was not stopped"
    assert sorted(notes) == ["fails", "hangs", "passes"], notes
    assert all(len(test["pid"]) == 3 and len(test["dir"]) == 2 for test in notes.values())
    assert not survivors, f"processes left by the inner tests: {survivors}\n{output}"
    left = [d for test in notes.values() for d in test["dir"] if Path(d).exists()]
    assert not left, f"directories left by the inner tests: {left}"


def wait_until_ended(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (running := [p for p in pids if processes.alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return running


def test_run_kills_the_whole_group_when_it_times_out(tmp_path: Path) -> None:
    note = tmp_path / "grandchild"
    with pytest.raises(subprocess.TimeoutExpired):
        processes.run(["sh", "-c", f'sleep 300 & echo $! > "{note}"; wait'], timeout=2)
    grandchild = int(note.read_text())
    assert wait_until_ended([grandchild]) == []


def test_an_owner_leaves_alone_what_an_outer_owner_adopted() -> None:
    with processes.owning("outer") as outer:
        with processes.owning("inner"):
            kept = subprocess.Popen(["sleep", "300"])
            outer.adopt(kept.pid)  # as a module's cluster restarting a worker during a test
            ended = subprocess.Popen(["sleep", "300"])
            spawned = processes.spawn(["sleep", "300"])
        assert ended.wait(10) == -signal.SIGTERM
        assert spawned.wait(10) == -signal.SIGTERM
        assert kept.poll() is None
    assert kept.wait(10) == -signal.SIGTERM
