"""Which weight blocks the window pins: as many bytes as the budget allows, spread evenly.

Every pinned byte is a byte never re-read, so :func:`choose_pinned` pins as many bytes as fit
beside the ring of streamed blocks. It spreads them evenly through the execution order rather
than pinning a prefix: compute on a pinned block is time the reader uses to fill the ring
ahead, so interleaving pinned and streamed blocks keeps the disk busy all the time, while
pinning the first layers would let the reader idle at the start of a step and stall later.
Pure arithmetic on block sizes: the planner asks it too, without loading anything.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence


def choose_pinned(sizes: Sequence[int], weight_budget: int, ring_slots: int) -> list[bool]:
    """Which blocks (in execution order) to pin so pinned bytes + the ring fit the budget.

    Everything is pinned when it all fits (no ring at all). Otherwise the ring is sized for
    the largest streamed block, and blocks are pinned in one fixed priority order
    (:func:`pin_order`: oversized blocks first, then the rest spread evenly through the
    execution order): the longest prefix of that order that fits with its ring, then whatever
    later blocks still fit in the bytes left over. A bigger budget therefore never pins fewer
    bytes (a longer prefix pins a superset, a same prefix gets more room for the rest).
    """
    n = len(sizes)
    if sum(sizes) <= weight_budget:
        return [True] * n
    order = pin_order(sizes, ring_slots)
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


def pin_order(sizes: Sequence[int], ring_slots: int) -> list[int]:
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
