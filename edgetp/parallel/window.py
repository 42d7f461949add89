"""The sliding-window weight scheduler: a byte budget per node, disk reads hidden behind compute.

A *block* is one layer's attention slice or MLP slice (and, on the master, the lm_head; see
:mod:`edgetp.parallel.blocks` for how its bytes are read and bound). Blocks that fit in the
budget are *pinned* (which ones: :mod:`edgetp.parallel.pinning`): read once, resident for good.
The rest are *streamed*: a background thread reads the next streamed block into a free buffer
of a small preallocated ring while the current block computes; the compute side waits only if
a read is late. Every tensor read is checked against the manifest's checksums on a second
thread while the reader reads the next one (a block is ready once all its tensors passed).

The model never knows: weights are swapped in by forward pre-hooks on the block's module and
released by forward hooks.

A failed read (a file deleted, truncated or unreadable) fails the forward that needs the block,
and only that one: the reader keeps running, the block is read again on the next forward (or on
:meth:`WeightWindow.retry`), and :attr:`WeightWindow.failure` says why until it reads again, so a
file that comes back is served again without a restart.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from torch import nn

from edgetp.core.metrics import RECORDER, now
from edgetp.core.pages import huge_page_bytes
from edgetp.parallel.blocks import BlockSpec, WindowError, bind_block, clear_block, read_block

DEFAULT_RING_SLOTS = 2


@dataclass
class WindowStats:
    """Counters since the last :meth:`WeightWindow.take_stats` (seconds and bytes)."""

    bytes_read: int = 0
    blocks_read: int = 0
    read_s: float = 0.0  # time the reader thread spent reading (checks included)
    check_s: float = 0.0  # of which waiting for checksum checks (they run beside the reads)
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
        self.raw = huge_page_bytes(nbytes)
        self.block: int | None = None  # index into the streamed list
        self.ready = False  # read (or failed: ``error``)
        self.in_use = False
        self.error: BaseException | None = None  # why reading ``block`` failed


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
        self._failed: tuple[int, str] | None = None  # the last streamed block that failed, why
        self._stop = False
        self._next_read = 0
        self._expected = 0  # the streamed block the compute side should ask for next
        self.pinned_bytes = sum(self._load_pinned(b) for b in self.pinned)
        ring = max((b.nbytes for b in self.streamed), default=0)
        self._slots = [_Slot(ring) for _ in range(ring_slots if self.streamed else 0)]
        self.ring_bytes = ring * len(self._slots)
        self.stats.resident_bytes = self.stats.resident_peak_bytes = self.resident_bytes
        for index, block in enumerate(self.streamed):
            clear_block(block)
            block.module.register_forward_pre_hook(self._make_acquire(index))
            block.module.register_forward_hook(self._make_release(index))
        # checks a block's tensors against their checksums while the reader reads the next
        self._checker = ThreadPoolExecutor(1, thread_name_prefix="edgetp-window-check")
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

    @property
    def failure(self) -> str | None:
        """Why the last failed read failed, until that block reads again (None: reads work)."""
        with self._cond:
            return None if self._failed is None else self._failed[1]

    def retry(self) -> None:
        """Read the failed block again now (in the background), unless a forward holds a block.

        Safe from any thread: a forward between two blocks resynchronises on its next block.
        """
        with self._cond:
            if self._failed is not None and not any(s.in_use for s in self._slots):
                self._resync(self._failed[0])

    def close(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._reader.is_alive():
            self._reader.join(timeout=timeout_s)
        self._checker.shutdown(wait=False)
        _OPEN_WINDOWS.discard(self)

    # -- pinned blocks ----------------------------------------------------------------------

    def _load_pinned(self, block: BlockSpec) -> int:
        storage = huge_page_bytes(block.nbytes)
        read_block(block, storage)
        bind_block(block, storage)
        return block.nbytes

    # -- the compute side -------------------------------------------------------------------

    def _make_acquire(self, index: int):  # noqa: ANN202 - a torch hook
        def acquire(_module: nn.Module, _args: object) -> None:
            slot = self._wait_for(index)
            bind_block(self.streamed[index], slot.raw)

        return acquire

    def _make_release(self, index: int):  # noqa: ANN202 - a torch hook
        def release(_module: nn.Module, _args: object, _output: object) -> None:
            clear_block(self.streamed[index])
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
                slot = next((s for s in self._slots if s.block == index and s.ready), None)
                if slot is not None and slot.error is not None:
                    error = slot.error
                    self._resync(index)  # the next forward reads it again: it may be back
                    raise WindowError(str(error)) from error
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
                clear_block(self.streamed[slot.block])  # type: ignore[index]
                slot.in_use = False

    def _resync(self, index: int) -> None:
        """The compute side jumped (an aborted step): drop what was read ahead, restart.

        A read still in flight is dropped too (it will not be marked ready): were it kept, its
        slot would hold a block the compute side no longer expects, the reader could find no
        free slot for ``index`` and both sides would wait forever.
        """
        for slot in self._slots:
            slot.block, slot.ready, slot.error = None, False, None
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
                if self._stop or slot is None:
                    return
                index = self._next_read
                self._next_read = (index + 1) % len(self.streamed)
                slot.block, slot.ready, slot.error = index, False, None
            self._read_into(slot, index)

    def _free_slot(self) -> _Slot | None:
        held = {s.block for s in self._slots if s.block is not None}
        if self._next_read in held:
            return None  # the whole stream is already resident in the ring
        return next((s for s in self._slots if s.block is None), None)

    def _read_into(self, slot: _Slot, index: int) -> None:
        block = self.streamed[index]
        started, started_clock = time.perf_counter(), now()
        try:
            checking = read_block(block, slot.raw, self._checker)
        except BaseException as exc:  # surfaces in the compute thread, never hangs it
            error = exc if str(block.path) in str(exc) else WindowError(
                f"cannot read shard file {block.path} ({block.name}): {exc}; copy the rank "
                "directory again")
            with self._cond:
                if slot.block == index:  # not dropped by a resync meanwhile
                    slot.ready, slot.error = True, error
                self._failed = (index, str(error))
                self._cond.notify_all()
            return
        elapsed = time.perf_counter() - started
        RECORDER.add("read", index, started_clock, now(), block.nbytes, thread=1)
        with self._cond:
            if slot.block == index:  # not dropped by a resync meanwhile
                slot.ready = True
            if self._failed is not None and self._failed[0] == index:
                self._failed = None  # the file is back
            self.stats.bytes_read += block.nbytes
            self.stats.blocks_read += 1
            self.stats.read_s += elapsed
            self.stats.check_s += checking
            self._cond.notify_all()
