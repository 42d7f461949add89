"""Message and byte counters of one node's links, by op and direction (for the reports)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Traffic:
    """Messages and bytes by op, each way."""

    sent: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0
    bytes_received: int = 0
    dropped: int = 0

    def count_sent(self, op: str, frames: Sequence[Any]) -> None:
        self.sent[op] += 1
        self.bytes_sent += sum(len(memoryview(f)) for f in frames)

    def count_received(self, op: str, frames: Sequence[Any]) -> None:
        self.received[op] += 1
        self.bytes_received += sum(len(f.buffer) if hasattr(f, "buffer") else len(f)
                                   for f in frames)

    def count_link(self, op: str, nbytes: int, sent: bool) -> None:
        """A message over a data link (edgetp.net.datalink)."""
        if sent:
            self.sent[op] += 1
            self.bytes_sent += nbytes
        else:
            self.received[op] += 1
            self.bytes_received += nbytes
