"""The context a node preallocates when ``--max-seq-len`` is not given: :func:`default_context`.

A model's maximum (``max_position_embeddings``) can be far more than a node holds: Llama 3.1
allows 131072 positions, whose KV cache alone takes 16 GiB in bfloat16, and a config may say
anything. So without ``--max-seq-len`` a node takes the model's maximum only when what grows
with the context (the KV cache and a decode step's attention scores of the layers it holds,
the RoPE tables) fits in 1/:data:`KV_MEMORY_SHARE` of the memory available to it; otherwise
the largest power of two that fits, and never less than :data:`MIN_CONTEXT`. It logs what it
chose and why (a warning when it is less than the model's maximum, so the commands print it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from edgetp.config.model import ModelConfig
from edgetp.core.metrics import available_memory_bytes
from edgetp.core.units import format_bytes

log = logging.getLogger("edgetp.model.context")

KV_MEMORY_SHARE = 4  # the context's memory may take at most a quarter of what is available
MIN_CONTEXT = 256  # the default context is never smaller (unless the model's maximum is)
ROPE_BYTES = 2 * 4  # cos and sin, float32, per position and dimension


def bytes_per_position(config: ModelConfig, heads: Iterable[tuple[int, int]],
                       element_bytes: int) -> int:
    """What one more position of context costs a node: for each layer it holds (``heads``:
    its KV heads and query heads there) the K and V rows and a decode step's attention score
    per query head, in the compute dtype; and the RoPE tables."""
    per_layer = (2 * kv * config.head_dim + queries for kv, queries in heads)
    return sum(per_layer) * element_bytes + ROPE_BYTES * config.head_dim


def whole_model_bytes_per_position(config: ModelConfig, element_bytes: int) -> int:
    """:func:`bytes_per_position` of every layer with all its heads (one node, or all of
    them on one machine)."""
    heads = [(config.num_key_value_heads, config.num_attention_heads)] * config.num_hidden_layers
    return bytes_per_position(config, heads, element_bytes)


def default_context(config: ModelConfig, per_position: int, available: int | None = None,
                    where: str = "this node", announce: bool = True) -> int:
    """The context for ``config`` at ``per_position`` bytes a position (see the module).

    ``available``: the memory to fit in (default: what this process may still take). With
    ``announce`` the choice is logged.
    """
    maximum = config.max_position_embeddings
    if available is None:
        available = available_memory_bytes()
    if available is None:  # nothing to go by: the model's own figure
        return maximum
    fitting = available // KV_MEMORY_SHARE // max(per_position, 1)
    if fitting >= maximum:
        if announce:
            log.info("context: the model's %d positions (%s for the KV cache and RoPE tables "
                     "of %s)", maximum, format_bytes(maximum * per_position), where)
        return maximum
    context = max(MIN_CONTEXT, 1 << max(fitting, 1).bit_length() - 1)
    context = min(context, maximum)
    if announce:
        log.warning("context: %d positions of the model's %d (all of them would take %s for "
                    "the KV cache of %s, more than a quarter of its %s available); set "
                    "--max-seq-len to choose", context, maximum,
                    format_bytes(maximum * per_position), where, format_bytes(available))
    return context
