"""Link profile files: the same checks and wording as the cluster file's link_profiles."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgetp.config.links import BUILTIN_PROFILES, LinkProfile, load_profiles
from edgetp.core.errors import ConfigError


def write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_file_extends_and_overrides_the_builtins(tmp_path: Path) -> None:
    path = write(tmp_path / "links.yaml", {"link_profiles": {
        "lan": {"latency_ms": 0.5, "bandwidth_mbit": 500},
        "gigabit": {"latency_ms": 0.1, "jitter_ms": 0.05, "description": "short cable"}}})
    profiles = load_profiles(path)
    assert profiles["lan"] == LinkProfile("lan", 0.5, 0.0, 500.0, "")
    assert profiles["gigabit"] == LinkProfile("gigabit", 0.1, 0.05, None, "short cable")
    assert profiles["tpi-llm"] == BUILTIN_PROFILES["tpi-llm"]
    assert load_profiles(write(tmp_path / "bare.yaml", {"lan": {"latency_ms": 2}}))["lan"]


@pytest.mark.parametrize("data, message", [
    ({"lan": {"latency": 1}},
     "links.yaml: lan: unknown key 'latency' (did you mean 'latency_ms'?); a link profile has "
     "latency_ms, jitter_ms, bandwidth_mbit, description"),
    ({"lan": {"jitter_ms": 1}}, "links.yaml: lan: 'latency_ms' is required (one way, per "
                                "traversal)"),
    ({"lan": {"latency_ms": "fast"}}, "links.yaml: lan.latency_ms must be a number, got 'fast'"),
    ({"lan": {"latency_ms": True}}, "links.yaml: lan.latency_ms must be a number, got True"),
    ({"lan": {"latency_ms": 1, "bandwidth_mbit": 0}},
     "links.yaml: lan.bandwidth_mbit must be a number > 0, got 0"),
    ({"lan": {"latency_ms": 1, "jitter_ms": -0.5}},
     "links.yaml: lan.jitter_ms must be >= 0, got -0.5"),
    ({"lan": [1]}, "links.yaml: lan: a link profile must be a mapping, got list"),
    (["lan"], "links.yaml must be a mapping, got ['lan']"),
])
def test_mistakes_name_the_file_the_profile_and_the_key(tmp_path: Path, data: object,
                                                        message: str) -> None:
    path = write(tmp_path / "links.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_profiles(path)
    assert str(info.value) == f"{tmp_path}/{message}"
