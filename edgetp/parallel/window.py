"""The sliding-window weight scheduler: a byte budget per node, disk reads hidden behind compute.

A *block* is one layer's attention slice or MLP slice (and, on the master, the lm_head). Blocks
that fit in the budget are *pinned*: read once, resident for good. The rest are *streamed*:
a background thread reads the next streamed block straight from its safetensors byte ranges
into a free buffer of a small preallocated ring while the current block computes; the compute
side waits only if a read is late. The page cache filled by streaming is released
(``posix_fadvise(DONTNEED)``) so the process's memory figures stay honest.

Pinning policy (:func:`choose_pinned`): pin as many bytes as the budget allows (every pinned
byte is a byte never re-read), and spread the pinned blocks evenly through the execution order
rather than pinning a prefix. Compute on a pinned block is time the reader uses to fill the
ring ahead, so interleaving pinned and streamed blocks keeps the disk busy all the time, while
pinning the first layers would let the reader idle at the start of a step and stall later.

The model never knows: weights are swapped in by forward pre-hooks on the block's module and
released by forward hooks.
"""

from __future__ import annotations

import atexit
import bisect
import itertools
import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from edgetp.core.errors import EdgetpError
from edgetp.core.metrics import RECORDER, now
from edgetp.shard.manifest import TensorEntry

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I8": torch.int8, "U8": torch.uint8}
DEFAULT_RING_SLOTS = 2


class WindowError(EdgetpError, RuntimeError):
    """A weight read failed or the budget cannot work; the message names the file or minimum."""


@dataclass(frozen=True)
class BlockSpec:
    """Where one block's tensors live on disk and which module parameters they become."""

    name: str  # e.g. "layers.3.mlp"
    module: nn.Module
    path: Path
    tensors: dict[str, TensorEntry]  # parameter name within the module -> bytes on disk

    @property
    def nbytes(self) -> int:
        """Bytes the block takes in a buffer (each tensor starts 64-byte aligned)."""
        return sum(_aligned(e.offsets[1] - e.offsets[0]) for e in self.tensors.values())

    def placements(self) -> list[tuple[str, TensorEntry, int]]:
        """(parameter name, disk entry, offset in the block's buffer) for every tensor."""
        out, cursor = [], 0
        for name, entry in self.tensors.items():
            out.append((name, entry, cursor))
            cursor += _aligned(entry.offsets[1] - entry.offsets[0])
        return out


def _aligned(nbytes: int, alignment: int = 64) -> int:
    return -(-nbytes // alignment) * alignment


def choose_pinned(sizes: Sequence[int], weight_budget: int, ring_slots: int) -> list[bool]:
    """Which blocks (in execution order) to pin so pinned bytes + the ring fit the budget.

    Everything is pinned when it all fits (no ring at all). Otherwise the ring is sized for
    the largest streamed block, and blocks are pinned in one fixed priority order
    (:func:`_pin_order`: oversized blocks first, then the rest spread evenly through the
    execution order): the longest prefix of that order that fits with its ring, then whatever
    later blocks still fit in the bytes left over. A bigger budget therefore never pins fewer
    bytes (a longer prefix pins a superset, a same prefix gets more room for the rest).
    """
    n = len(sizes)
    if sum(sizes) <= weight_budget:
        return [True] * n
    order = _pin_order(sizes, ring_slots)
    rest_max = [0] * (n + 1)  # the largest block still streaming once order[:k] is pinned
    for k in range(n - 1, -1, -1):
        rest_max[k] = max(rest_max[k + 1], sizes[order[k]])
    prefix, spare, prefix_bytes = 0, weight_budget - ring_slots * rest_max[0], 0
    for k in range(1, n):
        prefix_bytes += sizes[order[k - 1]]
        cost = prefix_bytes + ring_slots * rest_max[k]
        if cost <= weight_budget:
            prefix, spare = k, weight_budget - cost
    pinned = [False] * n
    for i in order[:prefix]:
        pinned[i] = True
    for i in order[prefix:]:  # the ring stays as sized for the prefix: these only use spare
        if 0 < sizes[i] <= spare:
            pinned[i] = True
            spare -= sizes[i]
    return pinned


GOLDEN = 0.6180339887498949
MAX_SPREAD_SAMPLES = 1 << 14


def _pin_order(sizes: Sequence[int], ring_slots: int) -> list[int]:
    """Block indices in pinning priority, independent of the budget.

    Empty blocks first (free), then any block at least ``ring_slots / (ring_slots - 1)``
    times the next largest, largest first (an lm_head of a big vocabulary: streaming it would
    size the whole ring, so pinning it costs nothing or saves bytes). The others follow in
    the order a low-discrepancy sequence of byte positions hits them, so that every prefix of
    the order is spread evenly through the execution order, by bytes.
    """
    order = [i for i, s in enumerate(sizes) if s <= 0]
    by_size = sorted((i for i, s in enumerate(sizes) if s > 0), key=lambda i: -sizes[i])
    while len(by_size) > 1 and (
            sizes[by_size[0]] + ring_slots * sizes[by_size[1]] <= ring_slots * sizes[by_size[0]]):
        order.append(by_size.pop(0))
    rest = sorted(by_size)
    ends = list(itertools.accumulate(sizes[i] for i in rest))
    seen: set[int] = set()
    for j in range(MAX_SPREAD_SAMPLES):
        if len(seen) == len(rest):
            break
        position = (0.5 + j * GOLDEN) % 1.0 * ends[-1]
        index = rest[min(bisect.bisect_right(ends, position), len(rest) - 1)]
        if index not in seen:
            seen.add(index)
            order.append(index)
    return order + [i for i in rest if i not in seen]  # blocks too small for any sample


@dataclass
class WindowStats:
    """Counters since the last :meth:`WeightWindow.take_stats` (seconds and bytes)."""

    bytes_read: int = 0
    blocks_read: int = 0
    read_s: float = 0.0  # time the reader thread spent reading
    wait_s: float = 0.0  # time the compute side waited for a read
    resident_bytes: int = 0
    resident_peak_bytes: int = 0
    per_block_wait_s: dict[str, float] = field(default_factory=dict)

    @property
    def overlap(self) -> float:
        """Fraction of read time hidden behind compute (1.0: the compute never waited)."""
        return 1.0 if self.read_s <= 0 else max(0.0, 1.0 - self.wait_s / self.read_s)


class _Slot:
    def __init__(self, nbytes: int) -> None:
        self.raw = torch.empty(nbytes, dtype=torch.uint8)
        self.block: int | None = None  # index into the streamed list
        self.ready = False
        self.in_use = False


_OPEN_WINDOWS: weakref.WeakSet[WeightWindow] = weakref.WeakSet()


@atexit.register
def _close_open_windows() -> None:
    """Stop every reader thread before the interpreter finalizes.

    The reader is a daemon thread that calls torch (slicing a ring buffer); a daemon thread
    that re-takes the GIL after finalization has begun is ended by ``pthread_exit`` from inside
    a pybind11 GIL guard's destructor, and that aborts the whole process ("terminate called
    without an active exception", status 134) - typically a master or worker exiting normally
    while the reader fills the ring for a step that will never come.
    """
    for window in list(_OPEN_WINDOWS):
        window.close(timeout_s=60.0)


class WeightWindow:
    """Pins some blocks, streams the others through a ring, swaps weights in by hooks."""

    def __init__(self, blocks: Sequence[BlockSpec], pinned: Sequence[bool],
                 ring_slots: int = DEFAULT_RING_SLOTS) -> None:
        self.pinned = [b for b, p in zip(blocks, pinned, strict=True) if p]
        self.streamed = [b for b, p in zip(blocks, pinned, strict=True) if not p]
        self.stats = WindowStats()
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = False
        self._next_read = 0
        self._expected = 0  # the streamed block the compute side should ask for next
        self.pinned_bytes = sum(self._load_pinned(b) for b in self.pinned)
        ring = max((b.nbytes for b in self.streamed), default=0)
        self._slots = [_Slot(ring) for _ in range(ring_slots if self.streamed else 0)]
        self.ring_bytes = ring * len(self._slots)
        self.stats.resident_bytes = self.stats.resident_peak_bytes = self.resident_bytes
        for index, block in enumerate(self.streamed):
            _clear(block)
            block.module.register_forward_pre_hook(self._make_acquire(index))
            block.module.register_forward_hook(self._make_release(index))
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name="edgetp-window-reader")
        if self.streamed:
            self._reader.start()
            _OPEN_WINDOWS.add(self)

    @property
    def resident_bytes(self) -> int:
        """Bytes of weights held in memory: pinned blocks plus the ring buffers."""
        return self.pinned_bytes + self.ring_bytes

    def take_stats(self) -> WindowStats:
        with self._cond:
            stats, self.stats = self.stats, WindowStats(
                resident_bytes=self.resident_bytes, resident_peak_bytes=self.resident_bytes)
        return stats

    def close(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._reader.is_alive():
            self._reader.join(timeout=timeout_s)
        _OPEN_WINDOWS.discard(self)

    # -- pinned blocks ----------------------------------------------------------------------

    def _load_pinned(self, block: BlockSpec) -> int:
        storage = torch.empty(block.nbytes, dtype=torch.uint8)
        _read_block(block, storage)
        _bind(block, storage)
        return block.nbytes

    # -- the compute side -------------------------------------------------------------------

    def _make_acquire(self, index: int):  # noqa: ANN202 - a torch hook
        def acquire(_module: nn.Module, _args: object) -> None:
            slot = self._wait_for(index)
            _bind(self.streamed[index], slot.raw)

        return acquire

    def _make_release(self, index: int):  # noqa: ANN202 - a torch hook
        def release(_module: nn.Module, _args: object, _output: object) -> None:
            _clear(self.streamed[index])
            with self._cond:
                for slot in self._slots:
                    if slot.block == index and slot.in_use:
                        slot.block, slot.ready, slot.in_use = None, False, False
                self._expected = (index + 1) % len(self.streamed)
                self._cond.notify_all()

        return release

    def _wait_for(self, index: int) -> _Slot:
        started = time.perf_counter()
        with self._cond:
            self._release_aborted()
            if index != self._expected:
                self._resync(index)
            while True:
                if self._error is not None:
                    raise WindowError(str(self._error)) from self._error
                slot = next((s for s in self._slots if s.block == index and s.ready), None)
                if slot is not None:
                    slot.in_use = True
                    break
                self._cond.wait(timeout=1.0)
        waited = time.perf_counter() - started
        RECORDER.add("read_wait", index, now() - waited, now())
        self.stats.wait_s += waited
        name = self.streamed[index].name
        self.stats.per_block_wait_s[name] = self.stats.per_block_wait_s.get(name, 0.0) + waited
        return slot

    def _release_aborted(self) -> None:
        """Free a slot still in use from a forward that raised inside its block (e.g. a failed
        allreduce): its release hook never ran. Blocks never nest, so no other is in use."""
        for slot in self._slots:
            if slot.in_use:
                _clear(self.streamed[slot.block])  # type: ignore[index]
                slot.in_use = False

    def _resync(self, index: int) -> None:
        """The compute side jumped (an aborted step): drop what was read ahead, restart.

        A read still in flight is dropped too (it will not be marked ready): were it kept, its
        slot would hold a block the compute side no longer expects, the reader could find no
        free slot for ``index`` and both sides would wait forever.
        """
        for slot in self._slots:
            slot.block, slot.ready = None, False
        self._next_read = index
        self._expected = index
        self._cond.notify_all()

    # -- the reader thread ------------------------------------------------------------------

    def _read_loop(self) -> None:
        while True:
            with self._cond:
                slot = self._free_slot()
                while slot is None and not self._stop:
                    self._cond.wait()
                    slot = self._free_slot()
                if self._stop:
                    return
                index = self._next_read
                self._next_read = (index + 1) % len(self.streamed)
                slot.block, slot.ready = index, False
            if not self._read_into(slot, index):
                return

    def _free_slot(self) -> _Slot | None:
        held = {s.block for s in self._slots if s.block is not None}
        if self._next_read in held:
            return None  # the whole stream is already resident in the ring
        return next((s for s in self._slots if s.block is None), None)

    def _read_into(self, slot: _Slot, index: int) -> bool:
        block = self.streamed[index]
        started, started_clock = time.perf_counter(), now()
        try:
            _read_block(block, slot.raw)
        except BaseException as exc:  # surfaces in the compute thread, never hangs it
            with self._cond:
                self._error = exc
                self._cond.notify_all()
            return False
        elapsed = time.perf_counter() - started
        RECORDER.add("read", index, started_clock, now(), block.nbytes, thread=1)
        with self._cond:
            if slot.block == index:  # not dropped by a resync meanwhile
                slot.ready = True
            self.stats.bytes_read += block.nbytes
            self.stats.blocks_read += 1
            self.stats.read_s += elapsed
            self._cond.notify_all()
        return True


def _read_block(block: BlockSpec, storage: torch.Tensor) -> None:
    """Read every tensor of ``block`` into consecutive ranges of ``storage`` (uint8)."""
    try:
        fd = os.open(block.path, os.O_RDONLY)
    except OSError as exc:
        raise WindowError(f"cannot open shard file {block.path}: {exc.strerror}; copy the "
                          "rank directory again") from exc
    try:
        for _name, entry, cursor in block.placements():
            start, stop = entry.offsets
            _pread_exact(fd, storage[cursor : cursor + stop - start], start, block.path)
            drop_page_cache(fd, start, stop - start)
    finally:
        os.close(fd)


def drop_page_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    """Tell the kernel we will not re-read these bytes (keeps memory figures honest)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _pread_exact(fd: int, target: torch.Tensor, offset: int, path: Path) -> None:
    view = memoryview(target.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise WindowError(f"short read from shard file {path} at byte {offset + done}: "
                              "the file is truncated; copy it again or re-split")
        done += n


def _bind(block: BlockSpec, storage: torch.Tensor) -> None:
    """Point the block's parameters at their bytes in ``storage`` (views, no copies)."""
    for name, entry, cursor in block.placements():
        nbytes = entry.offsets[1] - entry.offsets[0]
        dtype = SAFETENSORS_DTYPES[entry.dtype]
        _param(block.module, name).data = storage[cursor : cursor + nbytes].view(dtype).view(
            entry.shape)


def _clear(block: BlockSpec) -> None:
    for name in block.tensors:
        _param(block.module, name).data = torch.empty(0)


def _param(module: nn.Module, name: str) -> nn.Parameter:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return owner._parameters[attr]  # type: ignore[return-value]


class DiskEmbedding(nn.Module):
    """An embedding table left on disk: a lookup reads just the rows it needs.

    tokens [T] -> [T, d]. A prompt's rows cost T small reads; the table (2 GB for a 70B
    model in bfloat16) never occupies memory.
    """

    def __init__(self, path: Path, entry: TensorEntry, dtype: torch.dtype) -> None:
        super().__init__()
        self.path = path
        self.vocab_size, self.dim = entry.shape
        self.stored = SAFETENSORS_DTYPES[entry.dtype]
        self.row_bytes = self.dim * torch.empty((), dtype=self.stored).element_size()
        self.offset = entry.offsets[0]
        self.dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [T] -> [T, d]
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token id out of range for a vocabulary of {self.vocab_size}")
        out = torch.empty(tokens.numel(), self.row_bytes, dtype=torch.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, token in enumerate(tokens.tolist()):
                _pread_exact(fd, out[i], self.offset + token * self.row_bytes, self.path)
        finally:
            os.close(fd)
        return out.view(self.stored).view(tokens.numel(), self.dim).to(self.dtype)
