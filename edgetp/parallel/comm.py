"""What the parallel model needs of its group: one allreduce (sum) over the ranks.

The implementations that cross processes live in :mod:`edgetp.net.collectives`; this layer
never opens a socket. Every implementation sums partials in rank order, so a result never
depends on arrival order.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Communicator(Protocol):
    """One rank's handle on the group."""

    rank: int
    world_size: int

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        """Return the element-wise sum of ``x`` over all ranks (same shape and dtype).

        ``x`` is a temporary partial sum: an implementation may sum into it and return it.
        """


class SoloCommunicator:
    """The group of one: allreduce is the identity."""

    rank = 0
    world_size = 1

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        return x
