"""The bench report's parts in this process: spans through the wire format, percentiles, sweeps
and synthetic prompts (a real `edgetp bench` and `edgetp report`:
tests/integration/test_bench_report.py)."""

from __future__ import annotations

import pytest

from edgetp.core.metrics import Span, spans_from_tensor, spans_to_tensor
from edgetp.perf.bench import parse_sweeps, synthetic_prompt
from edgetp.perf.report import percentile


def test_spans_survive_the_wire_format() -> None:
    spans = [Span("layer", 3, 100.5, 0.25), Span("read", 7, 101.0, 0.5, 4096, thread=1)]
    back = spans_from_tensor(spans_to_tensor(spans, offset_s=2.0))
    assert [s.kind for s in back] == ["layer", "read"]
    assert back[0].start_s == pytest.approx(102.5) and back[1].nbytes == 4096
    assert spans_from_tensor(spans_to_tensor([])) == []


def test_helpers() -> None:
    assert percentile([1, 2, 3, 4], 0.5) == 2.5
    assert parse_sweeps(("nodes=1,2", "budget=1MB,none")) == {"nodes": ["1", "2"],
                                                             "budget": ["1MB", "none"]}
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        parse_sweeps(("colour=red",))
    prompt = synthetic_prompt(50, 20, {0, 1, 2})
    assert len(prompt) == 20 and not {0, 1, 2} & set(prompt)
