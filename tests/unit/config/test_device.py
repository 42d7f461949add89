"""Device profiles (``edgetp.config.device``): defaults resolve, every mistake is one clear error.

Each bad profile's message names where it came from, the key, and what a right value looks like.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgetp.config.device import (
    DATA_LINK_FRACTION,
    QUANT_MATVEC_FRACTION,
    DeviceProfile,
    load_profile,
    profile_figure,
)
from edgetp.core.errors import ConfigError

KNOWN = ("known: mem_bw_gbs, matvec_gbs, flops_gflops, disk_bw_mbs, layer_overhead_us, "
         "step_overhead_us, msg_overhead_us, data_msg_overhead_us, runtime_rss, free_memory")
PROBED = {  # what `edgetp probe` writes, figures and facts about the run
    "version": 1, "host": "pi", "cpu_count": 4, "threads": 4, "torch_version": "2.13.0",
    "quick": False, "matvec_shapes": [[2048, 2048]], "runtime_rss": 312000000,
    "mem_bw_gbs": 8.1, "matvec_gbs": {"float32": 5.2, "bfloat16": 3.1, "int8": 2.4, "int4": 2.2},
    "flops_gflops": {"float32": 21.0, "bfloat16": 9.5}, "layer_overhead_us": 180.0,
    "step_overhead_us": 420.0, "disk_seq_mbs": 310.0, "disk_path": "/srv", "disk_note": "",
    "disk_bw_mbs": 280.0, "msg_overhead_us": 95.0, "data_msg_overhead_us": 41.0,
    "free_memory": 3500000000, "total_memory": 4000000000,
    "link": {"rtt_ms": 1.2, "latency_ms": 0.6, "bandwidth_mbit": 900.0}, "probe_seconds": 41.0,
}


def test_a_minimal_profile_gets_the_documented_defaults() -> None:
    profile = DeviceProfile.from_dict({"mem_bw_gbs": 10})
    assert profile.mem_bw_gbs == 10.0
    assert profile.matvec_gbs == {"float32": 10.0, "bfloat16": 10.0,
                                  "int8": 10.0 * QUANT_MATVEC_FRACTION["int8"],
                                  "int4": 10.0 * QUANT_MATVEC_FRACTION["int4"]}
    assert profile.flops_gflops == {"float32": 50.0, "bfloat16": 50.0}
    assert (profile.disk_bw_mbs, profile.layer_overhead_us, profile.step_overhead_us,
            profile.msg_overhead_us) == (500.0, 150.0, 300.0, 60.0)
    assert profile.data_msg_overhead_us == pytest.approx(DATA_LINK_FRACTION * 60.0)
    assert profile.runtime_rss == 300 * 2**20 and profile.free_memory is None


def test_a_probed_profile_keeps_its_measured_figures() -> None:
    profile = DeviceProfile.from_dict(PROBED)
    assert profile.matvec_gbs == PROBED["matvec_gbs"]
    assert profile.flops_gflops == PROBED["flops_gflops"]
    assert profile.data_msg_overhead_us == 41.0 and profile.free_memory == 3500000000
    assert profile.matvec_bytes_per_s("int4") == 2.2e9
    assert profile.flops_per_s("bfloat16") == 9.5e9


def test_hand_written_forms_one_number_sizes_and_zero_overheads() -> None:
    profile = DeviceProfile.from_dict({
        "mem_bw_gbs": "12", "matvec_gbs": 6, "flops_gflops": 30, "runtime_rss": "250MB",
        "free_memory": "3GiB", "layer_overhead_us": 0, "msg_overhead_us": 0})
    assert profile.mem_bw_gbs == 12.0
    assert profile.matvec_gbs["bfloat16"] == 6.0 and profile.flops_gflops["float32"] == 30.0
    assert profile.runtime_rss == 250_000_000 and profile.free_memory == 3 * 2**30
    assert profile.layer_overhead_us == 0.0 and profile.data_msg_overhead_us == 0.0


BAD_PROFILES: dict[str, tuple[Any, str]] = {
    "missing key": ({"disk_bw_mbs": 300},
                    "the profile needs mem_bw_gbs (memory bandwidth, GB/s)"),
    "wrong type": ({"mem_bw_gbs": "fast"}, "mem_bw_gbs must be a positive number, got 'fast'"),
    "a list": ({"mem_bw_gbs": [1]}, "mem_bw_gbs must be a positive number, got [1]"),
    "negative rate": ({"mem_bw_gbs": -1}, "mem_bw_gbs must be a positive number, got -1"),
    "zero rate": ({"mem_bw_gbs": 10, "disk_bw_mbs": 0},
                  "disk_bw_mbs must be a positive number, got 0"),
    "infinite": ({"mem_bw_gbs": float("inf")}, "mem_bw_gbs must be a positive number, got inf"),
    "negative overhead": ({"mem_bw_gbs": 10, "msg_overhead_us": -1},
                          "msg_overhead_us must be a number >= 0, got -1"),
    "misspelt key": ({"mem_bw_gbs": 10, "disk_bw_mb": 3},
                     f"unknown profile key(s) ['disk_bw_mb'] (did you mean 'disk_bw_mbs'?); "
                     f"{KNOWN}"),
    "unknown key": ({"mem_bw_gbs": 10, "speed": 3}, f"unknown profile key(s) ['speed']; {KNOWN}"),
    "two unknown keys": ({"mem_bw_gbs": 10, "colour": 1, "matvec_gbps": 3},
                         "unknown profile key(s) ['colour', 'matvec_gbps'] (did you mean "
                         f"'matvec_gbs' for 'matvec_gbps'?); {KNOWN}"),
    "a dtype missing": ({"mem_bw_gbs": 10, "flops_gflops": {"float32": 3}},
                        "flops_gflops needs exactly the keys float32, bfloat16 "
                        "(or one number for both)"),
    "an unknown dtype": ({"mem_bw_gbs": 10, "matvec_gbs": {"float32": 3, "bfloat16": 2,
                                                           "fp8": 1}},
                         "matvec_gbs needs the keys float32, bfloat16 and may have int8, int4 "
                         "(or one number for both float dtypes)"),
    "a bad dtype figure": ({"mem_bw_gbs": 10, "matvec_gbs": {"float32": 3, "bfloat16": 2,
                                                             "int8": -1}},
                           "matvec_gbs.int8 must be a positive number, got -1"),
    "one bad number for both": ({"mem_bw_gbs": 10, "flops_gflops": "x"},
                                "flops_gflops must be a positive number, got 'x'"),
    "a size that does not parse": ({"mem_bw_gbs": 10, "runtime_rss": "lots"},
                                   "runtime_rss must be a size such as 300MB or 8GiB, got 'lots'"),
    "a negative size": ({"mem_bw_gbs": 10, "free_memory": -5},
                        "free_memory must be a size such as 300MB or 8GiB, got -5"),
    "not a mapping": ([1, 2], "a profile must be a mapping of figures"),
}


@pytest.mark.parametrize("name", list(BAD_PROFILES))
def test_a_bad_profile_is_one_error_naming_the_key_and_the_fix(name: str) -> None:
    data, message = BAD_PROFILES[name]
    with pytest.raises(ConfigError) as caught:
        DeviceProfile.from_dict(data, "c.yaml: node pi: profile")
    assert str(caught.value) == f"c.yaml: node pi: profile: {message}"


def test_a_profile_file_names_itself_and_who_asked_for_it(tmp_path: Path) -> None:
    path = tmp_path / "pi.json"
    path.write_text(json.dumps(PROBED))
    assert load_profile(path) == DeviceProfile.from_dict(PROBED)
    path.write_text(json.dumps({**PROBED, "mem_bw_gbs": 0}))
    with pytest.raises(ConfigError, match=rf"^c.yaml: node pi: {path}: mem_bw_gbs must be"):
        load_profile(path, "c.yaml: node pi")
    path.write_text('{"mem_bw_gbs": 3,')
    with pytest.raises(ConfigError, match=rf"^profile {path} is not valid JSON"):
        load_profile(path)
    missing = tmp_path / "nowhere.json"
    with pytest.raises(ConfigError) as caught:
        load_profile(missing, "c.yaml: node pi")
    assert str(caught.value) == (f"c.yaml: node pi: profile {missing} not found; create it "
                                 f"with `edgetp probe --out {missing}`")


def test_measured_figures_keep_four_significant_digits() -> None:
    assert profile_figure(1234.5678) == 1235.0 and profile_figure(0.000123456) == 0.0001235
