"""``edgetp probe --quick``: a device profile measured for real (the data link against a second
process), loadable, and leaving the shard directory as it found it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgetp.cli.main import main
from edgetp.config.device import load_profile
from edgetp.kernels import native as kernels
from edgetp.shard.split import split_checkpoint


@pytest.mark.slow  # 20 s of measuring: CI runs it with the slow tests
def test_probe_quick_writes_a_loadable_profile(tiny_model_dir, tmp_path):
    model_dir, _ = tiny_model_dir("llama3")
    split = split_checkpoint(model_dir, tmp_path / "split", 2).out_dir
    before = sorted(p.relative_to(split) for p in split.rglob("*"))
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(main, ["probe", "--quick", "--threads", "1", "--shard-dir",
                                       str(split), "--out", str(out)])
    assert result.exit_code == 0, result.output
    profile = load_profile(out)
    assert profile.matvec_gbs["float32"] > 0 and profile.disk_bw_mbs > 0
    assert profile.runtime_rss > 0 and profile.free_memory
    raw = json.loads(out.read_text())
    assert raw["matvec_shapes"] and "window" in raw["disk_note"] and raw["disk_seq_mbs"] > 0
    assert set(raw["matvec_gbs"]) == {"float32", "bfloat16", "int8", "int4"}  # all measured
    assert all(v > 0 for v in raw["matvec_gbs"].values())
    assert 0 < raw["data_msg_overhead_us"] and profile.data_msg_overhead_us > 0
    assert raw["kernel_paths"] == kernels.kernel_paths()  # the paths the rates were taken on
    assert set(raw["kernel_paths"]) == {"f32", "bf16", "i8", "i8_b32", "i4"}
    assert raw["kernel_target"] == "native" and "decode kernels: f32 " in result.output
    cores = str(kernels.usable_cores())
    assert raw["stream_reader"].startswith("native-" if kernels.available() else "torch")
    assert set(raw["stream_read_gbs"]) == {"1", cores} and min(raw["stream_read_gbs"].values()) > 0
    assert sorted(p.relative_to(split) for p in split.rglob("*")) == before  # test file gone
