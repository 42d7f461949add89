"""The span recorder's running totals: every span counted by kind, kept across takes and the
ring's turns (what ``/metrics`` reports as each node's time)."""

from __future__ import annotations

import pytest

from edgetp.core.metrics import SPAN_KINDS, Recorder


def test_totals_count_every_span_by_kind_across_takes_and_turns() -> None:
    recorder = Recorder(capacity=2)
    assert recorder.totals() == {kind: (0, 0.0) for kind in SPAN_KINDS}
    recorder.add("step", 1, 10.0, 10.5)
    recorder.add("layer", 0, 10.0, 10.25)
    recorder.add("step", 2, 11.0, 11.75)  # the ring turns: the first step is dropped
    assert len(recorder.take()) == 2
    recorder.add("step", 3, 12.0, 12.5)
    totals = recorder.totals()
    assert totals["step"] == (3, pytest.approx(1.75))
    assert totals["layer"] == (1, pytest.approx(0.25))
    assert totals["allreduce"] == (0, 0.0)


def test_a_disabled_recorder_counts_nothing() -> None:
    recorder = Recorder()
    recorder.enabled = False
    recorder.add("step", 1, 0.0, 1.0)
    assert recorder.totals()["step"] == (0, 0.0)
