"""Fixed limits the runtime keeps and the planner predicts with (no torch, no sockets).

The master caps its prefill chunk so that one chunk's hidden state (``[chunk, hidden]``
float32) stays under :data:`MAX_STEP_BYTES` on the wire; the planner sizes each rank's work
buffers and TTFT with the same chunk, so both ask :func:`master_prefill_chunk`.
"""

from __future__ import annotations

PREFILL_CHUNK = 256  # prompt tokens a step carries at most (the wire may allow fewer, below):
# one chunk widens each int8/int4 weight once and makes a layer's two allreduces; 256 halved
# a 256-token TTFT's widening and allreduce count against 128 (-15-20%), while a chunk between
# two decode steps of a batch stays a fraction of a second
MAX_STEP_BYTES = 4 << 20  # a prefill chunk's hidden state stays under this on the wire
FLOAT32_BYTES = 4  # the hidden state travels as float32 (before any wire compression)


def master_prefill_chunk(requested: int, hidden_size: int) -> int:
    """The prefill chunk (tokens) the master uses when asked for ``requested``: at least one
    token, and no more than fit :data:`MAX_STEP_BYTES` at ``hidden_size`` float32 values each."""
    return max(1, min(requested, MAX_STEP_BYTES // (FLOAT32_BYTES * hidden_size)))


DEFAULT_MAX_BATCH = 8  # sequences a master decodes together (``--max-batch``)
MAX_BATCH = 8  # ... at most: the rows the batched decode products take (ET_MAX_BATCH)
DEFAULT_KV_SLOTS = 8  # sequences a node holds keys and values for (``--kv-slots``)
MAX_KV_SLOTS = 64


def default_kv_slots(memory_budget: int | None) -> int:
    """A worker's KV slots when ``--kv-slots`` is not given: :data:`DEFAULT_KV_SLOTS`, or one
    on a node with a memory budget (every slot is counted out of it, and its memory would
    rather pin weights)."""
    return DEFAULT_KV_SLOTS if memory_budget is None else 1


def check_max_batch(max_batch: int) -> int:
    """``--max-batch`` if it is 1..:data:`MAX_BATCH`, else a ValueError saying so."""
    if not 1 <= max_batch <= MAX_BATCH:
        raise ValueError(f"--max-batch {max_batch}: 1 to {MAX_BATCH} sequences decode together "
                         "(the rows a decode step's products take at once)")
    return max_batch


def check_kv_slots(kv_slots: int, option: str = "--kv-slots") -> int:
    """``kv_slots`` if it is a sensible number of KV cache slots, else a ValueError that names
    ``option``."""
    if not 1 <= kv_slots <= MAX_KV_SLOTS:
        raise ValueError(f"{option} {kv_slots}: a node holds 1 to {MAX_KV_SLOTS} sequences")
    return kv_slots
