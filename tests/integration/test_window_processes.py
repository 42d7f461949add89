"""The sliding-window weight scheduler in processes of its own (``edgetp.parallel.window``):

* a process whose reader thread is still reading ahead exits cleanly;
* ``edgetp generate --nodes 2 --memory-budget <about the minimum>`` on the demo model: two
  processes, each streaming its weights, still count by the rule.
"""

from __future__ import annotations

import json
import os
import sys

from click.testing import CliRunner
from helpers import processes

from edgetp.cli.main import main
from edgetp.model.demo import DEMO_MODEL_DIR, demo_prompt, expected_text
from edgetp.parallel.loader import shard_memory_needs
from edgetp.shard.split import split_checkpoint

N_LAYERS = 6  # as the in-process window tests' models


# -- exiting with a busy reader -----------------------------------------------------------------

# Loads a shard at its minimum budget with reads slowed down (each tensor read is followed by
# a quarter of a second of torch calls, as reading into slices of a ring buffer makes), then exits
# while the reader thread is still reading ahead.
EXIT_SCRIPT = r"""
import sys, time, torch
import edgetp.parallel.blocks as blocks
from edgetp.parallel.comm import SoloCommunicator
from edgetp.parallel.loader import load_rank, shard_memory_needs

real_pread = blocks.pread_exact
def slow_pread(fd, target, offset, path):
    real_pread(fd, target, offset, path)
    end = time.monotonic() + 0.25
    while time.monotonic() < end:
        target[:64].view(torch.uint8).numpy()
blocks.pread_exact = slow_pread

shard = sys.argv[1]
budget = shard_memory_needs(shard, max_seq_len=64).minimum()
model = load_rank(shard, SoloCommunicator(), max_seq_len=64, memory_budget=budget)
time.sleep(0.3)
assert model.window._reader.is_alive()
print("exiting", flush=True)
"""


def test_process_exits_cleanly_while_the_reader_is_busy(tiny_model_dir, tmp_path):
    """Regression: a daemon reader thread inside torch at interpreter exit aborted the process
    ("terminate called without an active exception", status 134, after a normal run)."""
    model_dir, _ = tiny_model_dir("llama3", num_hidden_layers=N_LAYERS)
    [d] = split_checkpoint(model_dir, tmp_path / "split", 1).rank_dirs
    proc = processes.run([sys.executable, "-c", EXIT_SCRIPT, str(d)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"status {proc.returncode}: {proc.stderr[-2000:]}"
    assert "exiting" in proc.stdout


# -- end to end through the CLI -------------------------------------------------------------------


def test_generate_cli_with_a_budget_near_the_minimum(tmp_path):
    """Two processes, each with about its minimum budget (everything streamed), still count."""
    split = split_checkpoint(DEMO_MODEL_DIR, tmp_path / "probe", 2)
    needs = [shard_memory_needs(d) for d in split.rank_dirs]
    budget = max(n.minimum() for n in needs)
    assert all(budget < n.total for n in needs)  # both nodes stream
    result = CliRunner().invoke(
        main,
        ["generate", str(DEMO_MODEL_DIR), "--prompt", demo_prompt(4, 1), "--nodes", "2",
         "--memory-budget", str(budget), "--max-new-tokens", "64", "--json"],
        env={"EDGETP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["text"].strip() == expected_text(4, 1)
    assert report["finish_reason"] == "eos"
