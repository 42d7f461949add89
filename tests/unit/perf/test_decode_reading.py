"""benchmarks/decode.py's reading of a scaling target: the ratio split into computing and
waiting, the read rates while computing and the bus gain the target needs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "decode.py"


@pytest.fixture(scope="module")
def decode() -> ModuleType:
    sys.path.insert(0, str(SCRIPT.parent))  # its sibling distributed_llama.py
    try:
        spec = importlib.util.spec_from_file_location("decode_benchmark", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPT.parent))


GB = 1e9


def test_two_nodes_on_a_bus_that_gives_one_streams_rate(decode: ModuleType) -> None:
    """One device reads 2 GB in 100 ms (20 GB/s); the 2 nodes 1 GB each in 90 ms (rank 0's
    100 ms token: 10 ms waiting): 22.2 GB/s together, 1.11x; 0.6x needs the computing at
    0.5x, twice the gain."""
    many = decode.Side(100.0, [90.0, 90.0], [int(1 * GB), int(1 * GB)])
    one = decode.Side(100.0, [100.0], [int(2 * GB)])
    parts = decode.scaling_parts(many, one)
    assert parts["ratio"] == pytest.approx(1.0)
    assert parts["computing"] == pytest.approx(0.9) and parts["waiting"] == pytest.approx(0.1)
    assert parts["one_gbps"] == pytest.approx(20.0)
    assert parts["many_gbps"] == pytest.approx(2 * 1 / 0.09)
    assert parts["gain"] == pytest.approx(parts["many_gbps"] / 20.0)
    text = decode.bus_reason(parts, "vs1", 0.6)
    assert "1.00x = 0.90x computing + 0.10x waiting" in text
    needed = parts["gain"] * 0.9 / 0.5
    assert f"needs a bus gain of {needed:.2f}x" in text
    assert "one device alone" in text


def test_every_core_against_one_thread_and_waiting_past_the_target(decode: ModuleType) -> None:
    many = decode.Side(80.0, [40.0], [int(2 * GB)])  # 50 GB/s, 40 ms of waiting
    one = decode.Side(100.0, [95.0], [int(2 * GB)])
    parts = decode.scaling_parts(many, one)
    assert parts["gain"] == pytest.approx(50.0 / (2 / 0.095))
    text = decode.bus_reason(parts, "speedup", 1.5)  # 1.5x faster: a ratio of 0.67x
    assert "every core read 50.0 GB/s" in text and "one thread alone" in text
    assert "0.67x with this waiting needs" in text
    slow = decode.bus_reason(decode.scaling_parts(decode.Side(100.0, [20.0], [int(GB)]), one),
                             "speedup", 1.5)
    assert slow.endswith("the waiting alone is past 0.67x")
