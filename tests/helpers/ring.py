"""Ring allreduces inside one process: each rank a thread with its own real ring link."""

from __future__ import annotations

import threading
from typing import Any


def ring_sums(inputs: list[Any], wire_dtype: str = "f32",
              keys: list[Any] | None = None) -> dict[int, Any]:
    """Rank -> the sum of ``inputs`` (one tensor per rank) by ring links of one process,
    each rank in a thread, with the allreduce's first index of a two-allreduce step.
    ``keys``: a CURVE key pair per rank (else the links admit by token)."""
    from edgetp.net.collectives import StepPosition
    from edgetp.net.ring import RingAllreduce, RingLink, RingPeer, successors

    n = len(inputs)
    members = frozenset(pair.public for pair in keys or ())
    links = [RingLink("127.0.0.1", keys[r] if keys else None, members) for r in range(n)]
    peers = {r: RingPeer(f"tcp://127.0.0.1:{link.port}", link.public_key, link.token)
             for r, link in enumerate(links)}
    for rank, successor in successors(peers).items():
        links[rank].connect(successor)
    outputs: dict[int, Any] = {}

    def run(rank: int) -> None:
        position = StepPosition()
        position.begin(1, 1, 2)
        comm = RingAllreduce(rank, n, links[rank], position, wire_dtype, timeout_s=5.0)
        outputs[rank] = comm.allreduce(inputs[rank])

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    for link in links:
        link.close()
    return outputs
