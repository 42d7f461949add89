"""edgetp.core.files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetp.core.errors import ConfigError


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML file ``path`` (``what`` names it in errors: missing, not YAML)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
