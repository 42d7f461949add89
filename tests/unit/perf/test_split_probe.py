"""The bare split (edgetp.perf.split_probe): a rank's slices add up to the whole layer, each
dtype's product is the real product, and the probe times both sides in real processes."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from multiprocessing import resource_tracker
from pathlib import Path

import psutil
import pytest
import torch
from helpers import processes
from helpers.paths import REPO
from safetensors.torch import load_file

from edgetp.config.model import parse_hf_config
from edgetp.model.synthetic import llama_config, write_model
from edgetp.perf.split_probe import (
    ATTENTION,
    DTYPES,
    MLP,
    SplitProbe,
    head_product,
    product,
    rank_work,
    split_probe,
    step_rows,
    stored,
)
from edgetp.shard.layout import layer_file
from edgetp.shard.plan import PlanError
from edgetp.shard.split import split_checkpoint

TINY = parse_hf_config(llama_config(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                                    vocab=96))


@pytest.fixture(scope="module", autouse=True)
def _one_resource_tracker() -> None:
    """Spawned processes need multiprocessing's resource tracker, which ignores SIGTERM: started
    once for the module, it is ended once at the module's end, not after every test."""
    resource_tracker.ensure_running()


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_each_rank_holds_what_its_split_files_hold(parts: int, tmp_path: Path) -> None:
    """A rank's products have the shapes of the weights ``edgetp split`` writes for it (here a
    model whose heads are not hidden / heads wide, and with 4 ranks over 2 KV heads, where each
    rank keeps a whole KV head), and the master alone has the head."""
    config = llama_config(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=96)
    config["head_dim"] = 24  # q is 96 rows, not 64
    model = tmp_path / "model"
    write_model(model, config, seed=0)
    ranks = split_checkpoint(model, tmp_path / "split", parts).rank_dirs
    for rank, rank_dir in enumerate(ranks):
        work = rank_work(parse_hf_config(config), parts, rank)
        layer = load_file(str(rank_dir / layer_file(0)))
        written = [tuple(layer[f"self_attn.{n}.weight"].shape) for n in ATTENTION]
        assert list(work.attention) == written
        assert list(work.mlp) == [tuple(layer[f"mlp.{n}.weight"].shape) for n in MLP]
        assert work.layers == 2
        assert work.head == ((96, 64) if rank == 0 else None)


def test_a_split_the_plan_refuses_is_refused_before_any_process_starts() -> None:
    with pytest.raises(PlanError, match="every node needs at least one head"):
        SplitProbe(TINY, "float32", parts=8)
    with pytest.raises(ValueError, match="unknown weight dtype 'int3'"):
        SplitProbe(TINY, "int3")


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_dtypes_product_is_the_product(dtype: str) -> None:
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * 0.05  # [rows, cols]
    x, out = step_rows(dtype, 48, 64)
    out.fill_(float("nan"))
    product(dtype, stored(dtype, w, 32), x, out, 32)()
    expected = x.float() @ w.T  # [1, rows]
    tolerance = {"float32": 1e-5, "bfloat16": 3e-2, "int8": 3e-2, "int4": 2e-1}[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)


def test_int8_is_stored_in_blocks_where_the_width_allows_as_a_split_stores_it() -> None:
    q, scale = stored("int8", torch.randn(8, 64), 32)
    assert q.dtype == torch.int8 and scale.dim() == 3  # [2, out, in / 32]: a scale and a low
    q, scale = stored("int8", torch.randn(8, 48), 32)
    assert scale.shape == (8,)  # one scale a row


def test_the_head_is_stored_as_a_split_stores_it() -> None:
    assert head_product((96, 64), "int4", 32)() is not None  # int4 splits keep an int8 head


def test_an_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown weight dtype 'int3'"):
        stored("int3", torch.zeros(4, 4), 32)


def test_the_probe_times_one_device_against_the_split_in_real_processes() -> None:
    probe = split_probe(TINY, "float32", parts=2, tokens=2, rounds=2)
    assert len(probe["device_ms"]) == len(probe["split_ms"]) == 2
    assert all(ms > 0 for ms in probe["device_ms"] + probe["split_ms"])
    assert probe["ratios"] == [s / d for s, d in zip(probe["split_ms"], probe["device_ms"],
                                                       strict=True)]
    assert probe["ratio"] == statistics.median(probe["ratios"])


@pytest.mark.parametrize("dead", [1, 2])
def test_a_dead_probe_process_ends_the_session_at_once_with_a_message(dead: int) -> None:
    """Either rank of the split dying ends the round at once (the other spins at the barrier
    for it), long before the round's timeout, and every process ends."""
    with SplitProbe(TINY, "float32", tokens=1, timeout_s=300.0) as probe:
        assert all(ms > 0 for ms in probe.round())
        probe.procs[dead].kill()
        probe.procs[dead].join()
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="a bare-split process failed or hung"):
            probe.round()
        assert time.monotonic() - started < 30
    assert all(not p.is_alive() for p in probe.procs)


PARENT = """
import sys
from edgetp.config.model import parse_hf_config
from edgetp.model.synthetic import llama_config
from edgetp.perf.split_probe import SplitProbe
if __name__ == "__main__":
    config = parse_hf_config(llama_config(hidden=64, intermediate=128, layers=2, heads=4,
                                          kv_heads=2, vocab=96))
    with SplitProbe(config, "float32", tokens=1) as probe:
        probe.conns[1].send("run")  # rank 0 of the split alone: it spins for its peer
        print(*(p.pid for p in probe.procs), flush=True)
        sys.stdin.read()  # until killed
"""


def test_the_probe_processes_end_with_a_sigkilled_parent(tmp_path: Path) -> None:
    """Even a rank spinning at the barrier for a peer that never comes (it reads no pipe)."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = processes.spawn([sys.executable, str(script)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, cwd=REPO, text=True)
    assert parent.stdout is not None
    children = [psutil.Process(int(pid)) for pid in parent.stdout.readline().split()]
    assert len(children) == 3
    parent.kill()
    parent.wait()
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"still running after their parent's SIGKILL: {[p.pid for p in alive]}"
