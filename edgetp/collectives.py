"""Collectives over a :class:`Communicator`: allreduce (sum) between the ranks of one model.

Implementations: :class:`SoloCommunicator` (one rank: a no-op), :class:`InProcessGroup` (ranks
as threads of one process, for tests) and the star over ZeroMQ (``edgetp.star``). Every
implementation sums partials in rank order, so a result never depends on arrival order.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch


class Communicator(Protocol):
    """One rank's handle on the group."""

    rank: int
    world_size: int

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        """Return the element-wise sum of ``x`` over all ranks (same shape and dtype)."""


class SoloCommunicator:
    """The group of one: allreduce is the identity."""

    rank = 0
    world_size = 1

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


class InProcessGroup:
    """Ranks as threads of one process, summing through shared slots and a barrier."""

    def __init__(self, world_size: int, timeout_s: float = 60.0) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._slots: list[torch.Tensor | None] = [None] * world_size
        self._result: torch.Tensor | None = None
        self._barrier = threading.Barrier(world_size, timeout=timeout_s)

    def communicator(self, rank: int) -> InProcessCommunicator:
        return InProcessCommunicator(self, rank)

    def _allreduce(self, rank: int, x: torch.Tensor) -> torch.Tensor:
        self._slots[rank] = x
        if self._barrier.wait() == 0:  # one thread sums, in rank order
            total = self._slots[0].float().clone()  # type: ignore[union-attr]
            for part in self._slots[1:]:
                total += part.float()  # type: ignore[union-attr]
            self._result = total.to(x.dtype)
        self._barrier.wait()
        result = self._result
        assert result is not None
        out = result.clone()
        self._barrier.wait()  # nobody overwrites the slots before everyone has read
        return out


class InProcessCommunicator:
    def __init__(self, group: InProcessGroup, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.world_size = group.world_size

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.group._allreduce(self.rank, x)
