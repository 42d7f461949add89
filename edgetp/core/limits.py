"""Fixed limits the runtime keeps and the planner predicts with (no torch, no sockets).

The master caps its prefill chunk so that one chunk's hidden state (``[chunk, hidden]``
float32) stays under :data:`MAX_STEP_BYTES` on the wire; the planner sizes each rank's work
buffers and TTFT with the same chunk, so both ask :func:`master_prefill_chunk`.
"""

from __future__ import annotations

MAX_STEP_BYTES = 4 << 20  # a prefill chunk's hidden state stays under this on the wire
FLOAT32_BYTES = 4  # the hidden state travels as float32 (before any wire compression)


def master_prefill_chunk(requested: int, hidden_size: int) -> int:
    """The prefill chunk (tokens) the master uses when asked for ``requested``: at least one
    token, and no more than fit :data:`MAX_STEP_BYTES` at ``hidden_size`` float32 values each."""
    return max(1, min(requested, MAX_STEP_BYTES // (FLOAT32_BYTES * hidden_size)))
