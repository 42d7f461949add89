"""The ring allreduce inside one process: ring links on loopback, each rank a thread (over
real processes: tests/integration/test_ring.py)."""

from __future__ import annotations

import torch
from helpers.ring import ring_sums


def test_ring_allreduce_sums_chunks_over_threads() -> None:
    """Three ring links in one process: every rank gets the same sum, for odd widths too."""
    inputs = [torch.randn(2, 11, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    outputs = ring_sums(inputs)
    expected = inputs[0] + inputs[1] + inputs[2]
    for rank in range(3):
        assert torch.allclose(outputs[rank], expected, atol=1e-6)
        assert torch.equal(outputs[rank], outputs[0])  # bitwise identical on every rank
