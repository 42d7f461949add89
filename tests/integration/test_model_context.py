"""``edgetp generate`` on a model whose config.json claims 1e8 positions, under a real memory
limit: the default context fits the node's memory and the command says what it chose.

The demo model is copied with ``max_position_embeddings`` 1e8: preallocating that context
would take 176 GB (KV cache and RoPE tables), so before the default looked at the node's
memory, the process died. The command runs inside a memory cgroup of 1.5 GiB (skipped where
none can be made): it must pick a context whose KV cache fits a quarter of what the cgroup
leaves, print that choice, and answer correctly; ``--max-seq-len`` still decides when given.
A local cluster of two processes chooses once, for the whole model, and gives both nodes that
context.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import processes
from helpers.cgroup import CgroupUnavailable, cgroup_support, memory_cgroup

from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text

LIMIT = 1536 << 20
WHOLE_MODEL_POSITION = 4 * (2 * 4 * 12 + 8) * 4 + 2 * 4 * 12  # bytes a demo model position takes
CHOSEN = re.compile(r"^context: (\d+) positions of the model's 100000000 \(", re.MULTILINE)


@pytest.fixture
def huge_context_model(tmp_path: Path) -> Path:
    model_dir = tmp_path / "huge-context"
    shutil.copytree(DEMO_MODEL_DIR, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1e8}))
    return model_dir


def generate_in_cgroup(model_dir: Path, cwd: Path, *args: str, env_cache: Path | None = None
                       ) -> subprocess.CompletedProcess[str]:
    started: list[int] = []
    command = [sys.executable, "-m", "edgetp.cli", "generate", str(model_dir), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if env_cache is not None:
        env["EDGETP_CACHE"] = str(env_cache)
    with memory_cgroup("context", LIMIT, started) as group:
        return processes.run(group.wrap(command), timeout=240, capture_output=True, text=True,
                             cwd=cwd, env=env)


def test_generate_picks_a_context_that_fits_and_says_so(huge_context_model: Path,
                                                        tmp_path: Path) -> None:
    try:
        cgroup_support()
    except CgroupUnavailable as exc:
        pytest.skip(str(exc))
    proc = generate_in_cgroup(huge_context_model, tmp_path, "--prompt", demo_prompt(3, 5),
                              "--max-new-tokens", "40", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["text"].strip() == expected_text(3, 5)
    match = CHOSEN.search(proc.stderr)
    assert match, proc.stderr
    chosen = int(match.group(1))
    assert chosen & (chosen - 1) == 0 and chosen * WHOLE_MODEL_POSITION <= LIMIT // 4

    proc = generate_in_cgroup(huge_context_model, tmp_path, "--prompt", demo_prompt(3, 5),
                              "--max-seq-len", "4")
    assert proc.returncode == 1
    assert "leaves no room in a context of 4" in proc.stderr
    assert not CHOSEN.search(proc.stderr)


def test_a_local_cluster_picks_one_context_for_its_nodes(huge_context_model: Path,
                                                         tmp_path: Path) -> None:
    try:
        cgroup_support()
    except CgroupUnavailable as exc:
        pytest.skip(str(exc))
    proc = generate_in_cgroup(huge_context_model, tmp_path, "--nodes", "2", "--prompt",
                              demo_prompt(4, 10), "--max-new-tokens", "40", "--json",
                              env_cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["text"].strip() == expected_text(4, 10)
    (line,) = [line for line in proc.stderr.splitlines() if CHOSEN.match(line)]
    assert "for the KV cache of the 2 nodes" in line  # chosen once, for the whole model
