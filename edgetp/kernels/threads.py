"""How many threads a node computes on: the decode products' pool and torch's own, as one setting.

A node uses every core it may run on unless told otherwise (``--threads``, a cluster file's
``threads:``). Nodes that share one machine (a local cluster) divide its cores among them
(:func:`local_cluster_threads`), so that no process oversubscribes the CPUs: a busy core's
spare thread would only slow the node that waits for it.
"""

from __future__ import annotations

import torch

from edgetp.kernels import native


def use_threads(threads: int | None) -> int:
    """Compute on ``threads`` threads from now on (every usable core for None): the native
    products' pool and torch's intra-op threads. Returns the number in force."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    count = threads or native.usable_cores()
    torch.set_num_threads(count)
    native.set_threads(count)
    return count


def local_cluster_threads(cores: int, nodes: int) -> list[int]:
    """Threads of each node of a cluster on one machine of ``cores`` cores, the master (rank 0)
    first: an equal share each, the master also the remainder (it alone runs the head and the
    sampling); at least one each, so only more nodes than cores oversubscribe."""
    if nodes < 1:
        raise ValueError(f"a cluster has at least one node, got {nodes}")
    share = max(1, cores // nodes)
    return [max(1, cores - share * (nodes - 1))] + [share] * (nodes - 1)
