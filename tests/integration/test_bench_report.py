"""`edgetp bench` on two nodes writes a complete, consistent report; `edgetp report` reads it
back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetp.cli.main import main
from edgetp.kernels import native
from edgetp.kernels.threads import local_cluster_threads
from edgetp.model.demo import DEMO_MODEL_DIR
from edgetp.perf.bench import BenchSettings, run_bench
from edgetp.perf.report import BREAKDOWN

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    settings = BenchSettings(str(DEMO_MODEL_DIR), nodes=2, prompt_tokens=12, new_tokens=10,
                             repeat=2, warmup=1)
    run_bench(settings, out)
    return out


def test_bench_writes_every_kind_of_file(bench_dir: Path) -> None:
    for name in ("report.json", "report.md", "trace.json", "breakdown.png", "tokens.png"):
        assert (bench_dir / name).is_file(), name
    for name in ("breakdown.png", "tokens.png"):
        data = (bench_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
        import matplotlib.image

        image = matplotlib.image.imread(bench_dir / name)
        assert image.shape[0] > 100 and image.shape[1] > 100


def test_the_nodes_divide_the_machines_cores(bench_dir: Path) -> None:
    """A local cluster's processes compute on the machine's cores divided among them (the
    master, this process, included): none oversubscribes."""
    report = json.loads((bench_dir / "report.json").read_text())
    shares = local_cluster_threads(native.usable_cores(), 2)
    assert all(node["threads_torch"] == 1 for node in report["nodes"])  # after a decode step
    if native.available():
        assert [node["threads_native"] for node in report["nodes"]] == shares
    assert sum(shares) <= max(native.usable_cores(), 2)


def test_report_json_has_every_documented_field_with_plausible_values(bench_dir: Path) -> None:
    report = json.loads((bench_dir / "report.json").read_text())
    summary = report["summary"]
    assert summary["prompt_tokens"] == 12 and summary["generated_tokens_per_run"] == 10
    assert summary["runs"] == 2 and len(report["runs"]) == 2
    for key in ("ttft_ms", "decode_ms_per_token"):
        dist = summary[key]
        assert 0 < dist["min"] <= dist["p50"] <= dist["p90"] <= dist["max"]
    assert summary["tokens_per_s"] > 0
    assert {"machine", "model", "plan", "settings", "edgetp_version"} <= set(report)
    assert report["settings"]["nodes"] == 2 and report["plan"]["n_ranks"] == 2
    mean = summary["decode_ms_per_token"]["mean"]
    assert [n["rank"] for n in report["nodes"]] == [0, 1]
    for node in report["nodes"]:
        parts = node["breakdown_ms_per_token"]
        assert set(parts) == set(BREAKDOWN)
        assert all(v >= 0 for v in parts.values())
        assert abs(sum(parts.values()) - mean) <= 0.1 * mean  # adds up to the token time
        assert parts["compute"] > 0 and parts["allreduce"] > 0
        assert node["peak_rss_bytes"] > 10 * 2**20
        assert node["decode_steps"] == 2 * 9  # 10 tokens: 1 prefill + 9 decode steps, 2 runs
        assert len(node["per_layer"]) == 4
        assert node["allreduce_bytes_per_token"] > 0
        assert node["bytes_sent"] > 0 and node["bytes_received"] > 0


def test_trace_has_one_track_per_node_with_all_span_kinds(bench_dir: Path) -> None:
    trace = json.loads((bench_dir / "trace.json").read_text())
    events = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert sorted(names) == [0, 1]
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1}
    assert {"layer", "allreduce", "step"} <= {e["cat"] for e in spans}
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)


def test_worker_timeline_is_aligned_with_the_master(bench_dir: Path) -> None:
    """A worker's step span starts after the master sent it and ends before the master's."""
    trace = json.loads((bench_dir / "trace.json").read_text())
    steps = {(e["pid"], e["args"]["index"], round(e["ts"], -3)): e for e in trace["traceEvents"]
             if e.get("cat") == "step"}
    master = sorted((e for (pid, _, _), e in steps.items() if pid == 0), key=lambda e: e["ts"])
    worker = sorted((e for (pid, _, _), e in steps.items() if pid == 1), key=lambda e: e["ts"])
    assert len(master) == len(worker) > 0
    slack_us = 5_000  # clock-offset estimate error on loopback
    for m, w in zip(master, worker, strict=True):
        assert m["ts"] - slack_us <= w["ts"] <= m["ts"] + m["dur"] + slack_us


def test_report_command_prints_and_compares(bench_dir: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(main, ["report", str(bench_dir)])
    assert shown.exit_code == 0 and "ms/token" in shown.output and "rank 1" in shown.output
    compared = runner.invoke(main, ["report", str(bench_dir), str(bench_dir)])
    assert compared.exit_code == 0 and "1.00x" in compared.output
    missing = runner.invoke(main, ["report", str(bench_dir / "nope")])
    assert missing.exit_code != 0
