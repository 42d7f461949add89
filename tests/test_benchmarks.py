"""The allreduce benchmark runs end to end (real transport, spawned workers) and reports sanely."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_allreduce_benchmark_quick_json() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "allreduce.py"), "--quick", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    rows = {(r["size_bytes"], r["nodes"]): r for r in report["results"]}
    expected = {(size, n) for size in (1024, 64 * 1024) for n in (2, 4)}
    assert set(rows) == expected
    assert len(report["results"]) == len(expected)  # one entry each, no duplicates
    for row in rows.values():
        for key in ("pingpong_us", "allreduce_us"):
            assert row[key]["median"] > 0 and row[key]["p90"] >= row[key]["median"] > 0, row
            assert row[key]["n"] >= 10, row
        assert row["ratio"] > 0, row
        assert abs(row["ratio"] - row["allreduce_us"]["median"]
                   / row["pingpong_us"]["median"]) < 1e-9
    assert {v["nodes"] for v in report["verdicts"]} == {2, 4}
