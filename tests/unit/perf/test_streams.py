"""The read-bandwidth streams (edgetp.perf.streams): one process per stream, rounds together."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from edgetp.perf.streams import read_rates, round_rate


def test_one_and_two_streams_at_once_report_a_rate_each() -> None:
    rates = read_rates([1, 2], nbytes=4 << 20, seconds=0.02, rounds=2)
    assert set(rates) == {1, 2} and all(rate > 1e8 for rate in rates.values())  # > 0.1 GB/s
    assert not mp.active_children()  # every stream process has ended


def test_streams_that_did_not_overlap_count_once() -> None:
    together = round_rate([(0.0, 1.0, 10), (0.0, 1.0, 10)])
    one_after_the_other = round_rate([(0.0, 1.0, 10), (1.0, 2.0, 10)])
    assert together == 20 and one_after_the_other == 10


def test_stream_counts_must_be_positive() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        read_rates([0, 1])
