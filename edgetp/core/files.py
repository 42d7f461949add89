"""Reading the JSON and YAML files users give edgetp, with errors that name the file.

Both readers raise one :class:`~edgetp.core.errors.EdgetpError` (a :class:`ConfigError` unless
the caller names another kind, such as ``ShardError`` for a split's manifest) when the file is
missing or does not parse; ``what`` names the file in the message ("cluster file", "shard
manifest") and ``fix`` says what to do. What the parsed data must contain is the caller's
business (the ``config`` models validate it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgetp.core.errors import ConfigError, EdgetpError


def read_json(path: str | Path, what: str, error: type[EdgetpError] = ConfigError,
              fix: str = "") -> Any:
    """The parsed JSON file ``path``; a missing or unparsable file is an ``error``."""
    path = _existing(path, what, error, fix)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{_named(what, path)} is not valid JSON ({exc})", fix) from exc


def read_yaml(path: str | Path, what: str, error: type[EdgetpError] = ConfigError,
              fix: str = "") -> Any:
    """The parsed YAML file ``path``; a missing or unparsable file is an ``error``."""
    import yaml

    path = _existing(path, what, error, fix)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0]
        raise error(f"{_named(what, path)} is not valid YAML: {reason}", fix) from exc


def _existing(path: str | Path, what: str, error: type[EdgetpError], fix: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise error(f"{_named(what, path)} not found", fix)
    return path


def _named(what: str, path: Path) -> str:
    return f"{what} {path}" if what else str(path)
