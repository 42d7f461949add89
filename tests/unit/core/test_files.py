"""read_json and read_yaml: the parsed file, or one error naming the file and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgetp.core.errors import ConfigError, ShardError
from edgetp.core.files import read_json, read_yaml


def test_reads_json_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"x": [1, 2]}')
    (tmp_path / "a.yaml").write_text("x: [1, 2]\n")
    assert read_json(tmp_path / "a.json", "thing") == {"x": [1, 2]}
    assert read_yaml(str(tmp_path / "a.yaml"), "thing") == {"x": [1, 2]}


def test_a_missing_file_names_itself_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        read_json(tmp_path / "report.json", "report", fix="run `edgetp bench` first")
    path = tmp_path / "report.json"
    assert str(info.value) == f"report {path} not found; run `edgetp bench` first"
    assert info.value.fix == "run `edgetp bench` first"
    with pytest.raises(ConfigError, match=r"^cluster file .*c\.yaml not found$"):
        read_yaml(tmp_path / "c.yaml", "cluster file")


def test_a_file_that_does_not_parse_is_the_callers_kind_of_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match=r"shard manifest .*manifest\.json is not valid JSON"):
        read_json(tmp_path / "manifest.json", "shard manifest", ShardError)
    (tmp_path / "bad.yaml").write_text("nodes: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML: "):
        read_yaml(tmp_path / "bad.yaml", "cluster file")
    (tmp_path / "latin1.json").write_bytes(b'{"x": "\xe9"}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_json(tmp_path / "latin1.json", "")
