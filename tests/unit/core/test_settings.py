"""Every EDGETP_* variable is read in edgetp.core.settings, documented, and read when asked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers.paths import REPO

from edgetp.core import settings
from edgetp.core.errors import ConfigError

PACKAGE = REPO / "edgetp"


def test_every_variable_edgetp_mentions_is_listed() -> None:
    listed = {variable.name for variable in settings.VARIABLES}
    mentioned = set()
    for path in PACKAGE.rglob("*.py"):
        mentioned |= set(re.findall(r"\bEDGETP_[A-Z_]+[A-Z]", path.read_text()))
    assert mentioned <= listed, mentioned - listed


def test_only_the_settings_module_reads_the_environment_for_edgetp_variables() -> None:
    readers = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "core" / "settings.py":
            continue
        for line in path.read_text().splitlines():
            if re.search(r"(environ(\.get)?[\[(]|getenv\(|envvar=)\s*[\"']EDGETP_", line):
                readers.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert readers == []


def test_the_docs_list_every_variable() -> None:
    assert settings.markdown_table() in (REPO / "docs" / "configuration.md").read_text()


def test_accessors_read_the_environment_when_called(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    for name in (settings.ENV_CACHE, settings.ENV_NATIVE_KERNELS, settings.ENV_LOG,
                 settings.ENV_API_KEY, settings.ENV_DESCRIPTION):
        monkeypatch.delenv(name, raising=False)
    assert settings.cache_dir() == Path.home() / ".cache" / "edgetp"
    assert settings.native_kernels_enabled() and settings.log_level() == "INFO"
    assert settings.api_key() is None and settings.link_emulation() == "none"
    monkeypatch.setenv(settings.ENV_CACHE, str(tmp_path))
    monkeypatch.setenv(settings.ENV_NATIVE_KERNELS, "0")
    monkeypatch.setenv(settings.ENV_API_KEY, "")
    assert settings.cache_dir() == tmp_path and not settings.native_kernels_enabled()
    assert settings.api_key() is None  # empty counts as unset


def test_link_delay_is_checked() -> None:
    assert settings.link_delay_ms({}) == (0.0, 0.0)
    assert settings.link_delay_ms({settings.ENV_DELAY: " 5 ", settings.ENV_JITTER: "2"}) == (5, 2)
    with pytest.raises(ConfigError, match="EDGETP_LINK_JITTER_MS='-1' must be >= 0"):
        settings.link_delay_ms({settings.ENV_JITTER: "-1"})


def test_environment_restores_what_was_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.ENV_DELAY, "3")
    monkeypatch.delenv(settings.ENV_JITTER, raising=False)
    with settings.environment({settings.ENV_DELAY: "7", settings.ENV_JITTER: "1"}):
        assert settings.link_delay_ms() == (7.0, 1.0)
    assert settings.link_delay_ms() == (3.0, 0.0)
