"""The testbed's memory limits: a cgroup per node (v1 ``memory.limit_in_bytes`` or v2
``memory.max``, no swapping around it), and its peak use afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from edgetp.config.cluster import NodeConfig

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")
CGROUP_ROOTS = (V1_ROOT, V2_ROOT)
RUNTIME_OVERHEAD = int(1.5 * 2**30)  # python + torch beside the budget, for the default limit
DEFAULT_LIMIT = 4 * 2**30  # a node without budget or limit
NodeMemory = tuple[int | None, int | None]  # a node cgroup's (limit, peak) in bytes, if known


def node_memory_limit(node: NodeConfig) -> int:
    """The node's hard limit: ``memory_limit``, else its budget plus the runtime, else 4 GiB."""
    if node.memory_limit:
        return node.memory_limit
    return (node.memory_budget + RUNTIME_OVERHEAD) if node.memory_budget else DEFAULT_LIMIT


def cgroup_kind() -> tuple[str, Path] | None:
    """("v1", /sys/fs/cgroup/memory) or ("v2", /sys/fs/cgroup), whichever has memory."""
    if (V1_ROOT / "memory.limit_in_bytes").exists():
        return "v1", V1_ROOT
    controllers = V2_ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return "v2", V2_ROOT
    return None


def make_cgroup(kind: str, root: Path, parent_name: str, node: str, limit: int,
                created: list[Path]) -> Path:
    """``root/parent_name/node`` limited to ``limit`` bytes; each directory made is appended
    to ``created`` (parents first), for the cleanup."""
    parent = root / parent_name
    if not parent.exists():
        parent.mkdir()
        created.append(parent)
    if kind == "v2":
        for directory in (root, parent):
            with contextlib.suppress(OSError):
                (directory / "cgroup.subtree_control").write_text("+memory")
    cgroup = parent / node
    cgroup.mkdir()
    created.append(cgroup)
    limit_file = "memory.limit_in_bytes" if kind == "v1" else "memory.max"
    (cgroup / limit_file).write_text(str(limit))
    swap = cgroup / ("memory.memsw.limit_in_bytes" if kind == "v1" else "memory.swap.max")
    with contextlib.suppress(OSError):  # no swapping around the limit, where swap accounting is on
        swap.write_text(str(limit) if kind == "v1" else "0")
    return cgroup


def cgroup_peak(kind: str, cgroup: Path) -> int | None:
    return _read_bytes(cgroup / ("memory.max_usage_in_bytes" if kind == "v1" else "memory.peak"))


def cgroup_limit(kind: str, cgroup: Path) -> int | None:
    """The memory limit in force (None where unlimited or unreadable)."""
    return _read_bytes(cgroup / ("memory.limit_in_bytes" if kind == "v1" else "memory.max"))


def cgroup_memory(kind: str, cgroup: Path) -> NodeMemory:
    return cgroup_limit(kind, cgroup), cgroup_peak(kind, cgroup)


def _read_bytes(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().split()[0])
    return None


def remove_cgroup(cgroup: Path, log: Callable[[str], None]) -> None:
    """Remove ``cgroup`` and its children, killing what still runs in them."""
    if not cgroup.is_dir():
        return
    for child in sorted((p for p in cgroup.iterdir() if p.is_dir()), reverse=True):
        remove_cgroup(child, log)
    for _ in range(50):
        procs = (cgroup / "cgroup.procs").read_text().split() if (
            cgroup / "cgroup.procs").exists() else []
        for pid in procs:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        try:
            cgroup.rmdir()
            log(f"removed cgroup {cgroup}")
            return
        except OSError:
            time.sleep(0.1)
    log(f"warning: could not remove cgroup {cgroup}")
