"""How many threads a node computes on: the decode products' pool, and torch's for prefill.

A node uses every core it may run on unless told otherwise (``--threads``, a cluster file's
``threads:``). Nodes that share one machine (a local cluster) divide its cores among them
(:func:`local_cluster_threads`), so that no process oversubscribes the CPUs: a busy core's
spare thread would only slow the node that waits for it.

The one-token decode products run on the native pool (:mod:`edgetp.kernels.native`); torch's
own intra-op threads stay at one for a one-token step, whose many small ops lose more to
waking threads than they gain (the demo model on a loaded two-core machine: 11 ms/token with
one torch thread, 67 with two), and get the node's threads for a step of many tokens (prefill's
matmuls): :func:`step_threads`, called by the model for every step.
"""

from __future__ import annotations

import torch

from edgetp.kernels import native

_node_threads: int | None = None  # use_threads' last count; None: never called, torch untouched


def use_threads(threads: int | None) -> int:
    """Compute on ``threads`` threads from now on (every usable core for None): the native
    products' pool, and torch's for steps of many tokens. Returns the number in force."""
    global _node_threads
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    count = threads or native.usable_cores()
    native.set_threads(count)
    _node_threads = count
    torch.set_num_threads(count)
    return count


def node_threads() -> int | None:
    """The threads :func:`use_threads` set (None when it was never called)."""
    return _node_threads


def step_threads(rows: int) -> None:
    """torch's threads for a step of ``rows`` tokens: the node's for many, one for one (see the
    module docstring). Nothing changes in a process that never called :func:`use_threads`."""
    if _node_threads is None:
        return
    wanted = _node_threads if rows > 1 else 1
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


def local_cluster_threads(cores: int, nodes: int) -> list[int]:
    """Threads of each node of a cluster on one machine of ``cores`` cores, the master (rank 0)
    first: an equal share each, the master also the remainder (it alone runs the head and the
    sampling); at least one each, so only more nodes than cores oversubscribe."""
    if nodes < 1:
        raise ValueError(f"a cluster has at least one node, got {nodes}")
    share = max(1, cores // nodes)
    return [max(1, cores - share * (nodes - 1))] + [share] * (nodes - 1)
