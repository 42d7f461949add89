"""Ring allreduces inside one process: each rank a thread with its own real ring link."""

from __future__ import annotations

import threading
from typing import Any


def ring_sums(inputs: list[Any], wire_dtype: str = "f32") -> dict[int, Any]:
    """Rank -> the sum of ``inputs`` (one tensor per rank) by ring links of one process,
    each rank in a thread, with the allreduce's first index of a two-allreduce step."""
    from edgetp.net.collectives import StepPosition
    from edgetp.net.ring import RingAllreduce, RingLink, successor_addresses

    n = len(inputs)
    links = [RingLink("127.0.0.1") for _ in range(n)]
    addresses = {r: f"tcp://127.0.0.1:{links[r].port}" for r in range(n)}
    for rank, address in successor_addresses(addresses, n).items():
        links[rank].connect(address or addresses[0])
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
