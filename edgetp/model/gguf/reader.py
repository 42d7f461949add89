"""Opening a GGUF file: its metadata by key and its tensors by name, or one clear error.

A :class:`GGUFFile` wraps llama.cpp's own reader (``gguf.GGUFReader``, which memory-maps the
file: tensors are read only when their bytes are touched). Anything wrong with the file (not
a GGUF, truncated, a tensor whose bytes run past the end) is a :class:`GGUFError` that names
the file, raised when it is opened rather than halfway through a conversion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgetp.core.errors import ModelError

GGUF_SUFFIX = ".gguf"


class GGUFError(ModelError):
    """A GGUF file edgetp cannot read or convert; the message says what and why."""


def is_gguf_path(path: str | Path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix; its content is checked on opening)."""
    return Path(path).suffix.lower() == GGUF_SUFFIX


class GGUFFile:
    """One GGUF file: ``value(key)`` for metadata, ``tensors`` by name (``gguf.ReaderTensor``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path} not found", "give the path of a .gguf file")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, IndexError, OverflowError, OSError, KeyError) as exc:
            raise GGUFError(
                f"{self.path} is not a readable GGUF file ({exc})",
                "the file may be truncated (an interrupted download) or not GGUF") from exc
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._check_sizes()

    def _check_sizes(self) -> None:
        size = self.path.stat().st_size
        for tensor in self.tensors.values():
            if tensor.data_offset + tensor.n_bytes > size:
                raise GGUFError(f"{self.path} is truncated: tensor {tensor.name} runs past the "
                                f"end of the file ({size} bytes)",
                                "download the file again")

    @property
    def architecture(self) -> str:
        return str(self.value("general.architecture", ""))

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def value(self, key: str, default: Any = None) -> Any:
        """The metadata value of ``key`` (a number, string, bool or list), ``default`` if absent."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return _plain(value)

    def arch_value(self, key: str, default: Any = None) -> Any:
        """``{architecture}.{key}``, e.g. ``block_count``."""
        return self.value(f"{self.architecture}.{key}", default)

    def required(self, key: str) -> Any:
        value = self.arch_value(key)
        if value is None:
            raise GGUFError(f"{self.path} lacks the metadata key {self.architecture}.{key}",
                            "the file was written by a converter edgetp does not know")
        return value


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers (float32 values by their shortest decimal spelling)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.floating | float) and not isinstance(value, bool):
        return float(str(np.float32(value)))
    if isinstance(value, np.integer):
        return int(value)
    return value
