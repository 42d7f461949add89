"""What /proc/self/smaps says about the mapping holding an address (Linux)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SMAPS = Path("/proc/self/smaps")


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    path: str  # "" for anonymous memory
    flags: frozenset[str]  # VmFlags: "hg" = advised huge pages
    anon_huge_kib: int


def mapping_of(address: int) -> Mapping | None:
    """The mapping of this process that holds ``address``; None if none does."""
    found: dict[str, object] | None = None
    for line in SMAPS.read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            if found is not None:
                break
            start, end = (int(part, 16) for part in head[0].split("-"))
            if start <= address < end:
                found = {"start": start, "end": end,
                         "path": head[5] if len(head) > 5 else "", "flags": frozenset(),
                         "anon_huge_kib": 0}
        elif found is not None and head[0] == "AnonHugePages:":
            found["anon_huge_kib"] = int(head[1])
        elif found is not None and head[0] == "VmFlags:":
            found["flags"] = frozenset(head[1:])
    return None if found is None else Mapping(**found)  # type: ignore[arg-type]
