"""Timers and counters: where every millisecond of a step went, on every node.

Each process has one :data:`RECORDER`. The runtime records *spans* (a kind, a name, a start on
this node's clock, a duration) at the points that matter: a decoder layer, an allreduce wait,
a weight-read wait (compute side), a weight read (reader thread), the head, a whole step.
Workers ship their spans to the master as one float64 tensor per request, already shifted to
the master's clock (offset estimated at the handshake), so timelines from all nodes line up.

Recording costs two ``perf_counter`` calls and the write of one row. The spans are kept as rows
of six float64 numbers in a ring of at most :data:`MAX_SPANS` rows (48 bytes a span, 12 MiB at
most): a process whose spans nobody takes (a server, its workers) keeps the latest window of
them, and its memory stops growing when the ring is full. ``bench`` takes them after its runs.
Beside the ring, the recorder keeps running totals per kind (spans and seconds since the process
began, untouched by :meth:`Recorder.take`), which the API server's ``/metrics`` reports.
"""

from __future__ import annotations

import os
import threading
import time
from array import array
from dataclasses import dataclass

import torch

SPAN_KINDS = ("step", "layer", "allreduce", "read_wait", "read", "head", "embed", "sample")
KIND_INDEX = {kind: i for i, kind in enumerate(SPAN_KINDS)}
MAX_SPANS = 1 << 18  # the spans a process keeps before the oldest are overwritten
SPAN_FIELDS = 6  # kind, index, start, duration, bytes, thread: one float64 each


@dataclass(frozen=True, slots=True)
class Span:
    kind: str
    index: int  # layer number, allreduce number or block number; -1 when not applicable
    start_s: float  # on the recording node's perf clock, or the master's after alignment
    duration_s: float
    nbytes: int = 0  # bytes moved (allreduce: sent + received by this node; read: bytes read)
    thread: int = 0  # 0: compute thread, 1: reader thread


class Recorder:
    """A thread-safe ring of the latest ``capacity`` spans of this process.

    ``dropped`` counts the spans overwritten since the last :meth:`take`; :meth:`totals` are
    the counts and seconds of every span recorded, by kind.
    """

    def __init__(self, capacity: int = MAX_SPANS) -> None:
        self._lock = threading.Lock()
        self.enabled = True
        self._total_counts = [0] * len(SPAN_KINDS)
        self._total_seconds = [0.0] * len(SPAN_KINDS)
        self.resize(capacity)

    def resize(self, capacity: int) -> None:
        """Keep at most ``capacity`` spans from now on (the spans held are dropped)."""
        if capacity < 1:
            raise ValueError(f"a recorder keeps at least one span, got {capacity}")
        with self._lock:
            self.capacity = capacity
            self._clear()

    def _clear(self) -> None:
        self._rows = array("d")  # SPAN_FIELDS numbers per span, grown up to capacity rows
        self._next = 0  # the row the next span goes to
        self._count = 0
        self.dropped = 0

    def add(self, kind: str, index: int, start_s: float, end_s: float, nbytes: int = 0,
            thread: int = 0) -> None:
        if self.enabled:
            row = (KIND_INDEX[kind], index, start_s, end_s - start_s, nbytes, thread)
            with self._lock:
                self._total_counts[row[0]] += 1
                self._total_seconds[row[0]] += row[3]
                at = self._next * SPAN_FIELDS
                if at == len(self._rows):
                    self._rows.extend(row)
                else:
                    self._rows[at:at + SPAN_FIELDS] = array("d", row)
                self._next = (self._next + 1) % self.capacity
                if self._count < self.capacity:
                    self._count += 1
                else:
                    self.dropped += 1

    def __len__(self) -> int:
        return self._count

    def totals(self) -> dict[str, tuple[int, float]]:
        """Kind -> (spans, seconds) of every span recorded since the process began."""
        with self._lock:
            return {kind: (self._total_counts[i], self._total_seconds[i])
                    for i, kind in enumerate(SPAN_KINDS)}

    @property
    def nbytes(self) -> int:
        """The memory the spans held take."""
        return self._rows.buffer_info()[1] * self._rows.itemsize

    def take(self) -> list[Span]:
        """All spans since the last take (the latest ``capacity`` of them), oldest first."""
        with self._lock:
            numbers, count = self._rows.tolist(), self._count
            first = self._next if count == self.capacity else 0  # the oldest row
            self._clear()
        return [_span(numbers, (first + i) % count) for i in range(count)]


def _span(numbers: list[float], row: int) -> Span:
    kind, index, start, duration, nbytes, thread = numbers[row * SPAN_FIELDS:
                                                           (row + 1) * SPAN_FIELDS]
    return Span(SPAN_KINDS[int(kind)], int(index), start, duration, int(nbytes), int(thread))


RECORDER = Recorder()


def now() -> float:
    """The clock spans use: ``time.time()`` resolution, monotonic-enough for one request."""
    return time.perf_counter() + _PERF_TO_WALL


_PERF_TO_WALL = time.time() - time.perf_counter()


def spans_to_tensor(spans: list[Span], offset_s: float = 0.0) -> torch.Tensor:
    """[N, 7] float64: kind, index, start (shifted by offset), duration, bytes, thread."""
    rows = [(KIND_INDEX[s.kind], s.index, s.start_s + offset_s, s.duration_s, s.nbytes,
             s.thread, 0.0) for s in spans]
    if not rows:
        return torch.zeros((1, 7), dtype=torch.float64) - 1  # a single "no span" row
    return torch.tensor(rows, dtype=torch.float64)


def spans_from_tensor(table: torch.Tensor) -> list[Span]:
    """Inverse of :func:`spans_to_tensor`; rows with an unknown kind are skipped."""
    if table.dim() != 2 or table.shape[1] != 7:
        raise ValueError(f"span table of shape {list(table.shape)}, expected [N, 7]")
    out = []
    for kind, index, start, duration, nbytes, thread, _ in table.tolist():
        if 0 <= kind < len(SPAN_KINDS) and duration >= 0:
            out.append(Span(SPAN_KINDS[int(kind)], int(index), start, duration, int(nbytes),
                            int(thread)))
    return out


def peak_rss_bytes() -> int:
    """The process's resident-memory high-water mark (VmHWM), in bytes."""
    return _proc_status_kib("VmHWM") * 1024


def current_rss_bytes() -> int:
    return _proc_status_kib("VmRSS") * 1024


def available_memory_bytes() -> int | None:
    """The memory this process may still take: ``MemAvailable``, or less when its cgroup's limit
    leaves less (None when neither can be read)."""
    figures = [_meminfo_available(), *_cgroup_headroom()]
    known = [f for f in figures if f is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


CGROUP_MEMORY_FILES = {  # controllers in /proc/self/cgroup -> (mount, limit file, usage file)
    ":": ("/sys/fs/cgroup", "memory.max", "memory.current"),  # v2: "0::PATH"
    "memory:": ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"),  # v1
}


def _cgroup_headroom() -> list[int]:
    """Limit minus usage of each memory cgroup this process is in, and of their parents."""
    try:
        with open("/proc/self/cgroup") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        for key, (mount, limit_file, usage_file) in CGROUP_MEMORY_FILES.items():
            _, _, rest = line.partition(":")
            if rest.startswith(key):
                out += _headroom_up(mount, rest[len(key):], limit_file, usage_file)
    return out


def _headroom_up(mount: str, path: str, limit_file: str, usage_file: str) -> list[int]:
    out = []
    while True:
        group = f"{mount}{path.rstrip('/')}"
        try:
            with open(f"{group}/{limit_file}") as limit, open(f"{group}/{usage_file}") as used:
                text = limit.read().strip()
                if text != "max":
                    out.append(max(0, int(text) - int(used.read())))
        except (OSError, ValueError):
            pass
        if path in ("/", ""):
            return out
        path = path.rsplit("/", 1)[0] or "/"


def _proc_status_kib(field: str) -> int:
    try:
        with open(f"/proc/{os.getpid()}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def node_facts() -> dict[str, float | int | str]:
    """Static and peak figures of this process, for the report."""
    return {
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_bytes": current_rss_bytes(),
        "threads_torch": torch.get_num_threads(),
        "threads_process": threading.active_count(),
        "pid": os.getpid(),
    }


def instrument(model: torch.nn.Module) -> None:
    """Record a span for every local decoder layer and the head of ``model`` (via hooks)."""
    layers: list[torch.nn.Module | None] = list(model.layers)  # type: ignore[arg-type]
    for index, layer in enumerate(layers):
        if layer is not None:
            _time_module(layer, "layer", index)
    head = getattr(model, "lm_head", None)
    if head is not None:
        _time_module(head, "head", -1)


def _time_module(module: torch.nn.Module, kind: str, index: int) -> None:
    started: list[float] = []

    def before(_module: torch.nn.Module, _args: object) -> None:
        started.append(now())

    def after(_module: torch.nn.Module, _args: object, _output: object) -> None:
        if started:
            RECORDER.add(kind, index, started.pop(), now())

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)


def window_facts(model: torch.nn.Module) -> dict[str, float | int]:
    """The window's counters since the last call (empty when nothing streams)."""
    window = getattr(model, "window", None)
    if window is None:
        return {"window_resident_peak_bytes": 0, "window_bytes_read": 0}
    stats = window.take_stats()
    return {
        "window_resident_peak_bytes": stats.resident_peak_bytes,
        "window_pinned_bytes": window.pinned_bytes,
        "window_ring_bytes": window.ring_bytes,
        "window_pinned_blocks": len(window.pinned),
        "window_streamed_blocks": len(window.streamed),
        "window_bytes_read": stats.bytes_read,
        "window_blocks_read": stats.blocks_read,
        "window_read_s": stats.read_s,
        "window_wait_s": stats.wait_s,
        "window_overlap": stats.overlap,
    }
