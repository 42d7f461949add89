"""The bare split (edgetp.perf.split_probe): a rank's slices add up to the whole layer, each
dtype's product is the real product, and the probe times both sides in real processes."""

from __future__ import annotations

import statistics
from multiprocessing import resource_tracker

import pytest
import torch

from edgetp.model.synthetic import llama_config
from edgetp.perf.split_probe import (
    DTYPES,
    LayerShape,
    SplitProbe,
    head_product,
    product,
    split_probe,
    step_rows,
    stored,
)

TINY = LayerShape(hidden=64, kv=32, intermediate=128, layers=2, vocab=96)


@pytest.fixture(scope="module", autouse=True)
def _one_resource_tracker() -> None:
    """Spawned processes need multiprocessing's resource tracker, which ignores SIGTERM: started
    once for the module, it is ended once at the module's end, not after every test."""
    resource_tracker.ensure_running()


def test_the_shape_comes_from_a_models_config() -> None:
    config = llama_config(hidden=256, intermediate=704, layers=3, heads=8, kv_heads=2, vocab=512)
    assert LayerShape.of(config) == LayerShape(256, 2 * 32, 704, 3, 512)
    assert LayerShape.of({**config, "head_dim": 16}).kv == 2 * 16


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_the_ranks_slices_add_up_to_the_whole_layer(parts: int) -> None:
    whole = [sum(r * c for r, c in half) for half in TINY.halves(1)]
    attention, mlp = TINY.halves(parts)
    assert [parts * sum(r * c for r, c in attention), parts * sum(r * c for r, c in mlp)] == whole
    h, kv, f = TINY.hidden, TINY.kv, TINY.intermediate
    assert attention == [(h // parts, h), (kv // parts, h), (kv // parts, h), (h, h // parts)]
    assert mlp == [(f // parts, h), (f // parts, h), (h, f // parts)]


def test_a_layer_that_does_not_split_is_refused() -> None:
    with pytest.raises(ValueError, match="does not split into 3 parts"):
        TINY.halves(3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_dtypes_product_is_the_product(dtype: str) -> None:
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * 0.05  # [rows, cols]
    x, out = step_rows(dtype, 48, 64)
    out.fill_(float("nan"))
    product(dtype, stored(dtype, w, 32), x, out, 32)()
    expected = x.float() @ w.T  # [1, rows]
    tolerance = {"float32": 1e-5, "bfloat16": 3e-2, "int8": 3e-2, "int4": 2e-1}[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)


def test_the_head_is_stored_as_a_split_stores_it() -> None:
    assert head_product(TINY, "int4", 32)() is not None  # int4 splits keep an int8 head


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


def test_a_dead_probe_process_ends_the_session_with_a_message() -> None:
    with SplitProbe(TINY, "float32", tokens=1, timeout_s=5.0) as probe:
        assert all(ms > 0 for ms in probe.round())
        probe.procs[2].kill()  # a rank of the split
        probe.procs[2].join()
        with pytest.raises(RuntimeError, match="a bare-split process failed or hung"):
            probe.round()
    assert all(not p.is_alive() for p in probe.procs)
