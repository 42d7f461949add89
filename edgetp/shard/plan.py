"""The shard plan: which attention heads and MLP columns each rank owns, as plain data.

This is the only place those decisions are made; the splitter, the loader and the rewrite all
read a :class:`ShardPlan`, so they cannot drift apart.

Attention is split by KV-head groups: a rank's query heads are exactly the groups of its KV
heads, so no KV head is stored twice. With more ranks than KV heads the query heads of a group
are split across ranks instead, and each of those ranks holds its own copy of that group's KV
head (so up to ``num_attention_heads`` ranks work). q/k/v and gate/up are column-parallel,
o_proj and down_proj row-parallel; norms are replicated; the embedding, the final norm and the
lm_head belong to rank 0 (the master).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from edgetp.config.model import ModelConfig
from edgetp.core.errors import ConfigError

PLAN_VERSION = 1
MLP_ALIGNMENTS = (128, 64, 32, 16, 8, 4, 2, 1)


class PlanError(ConfigError):
    """The requested split cannot be made; the message says what is possible."""


@dataclass(frozen=True)
class RankShare:
    """What one rank owns. Ranges are half-open ``[start, stop)`` in global indices."""

    rank: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    mlp_columns: tuple[int, int]

    @property
    def n_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def n_mlp_columns(self) -> int:
        return self.mlp_columns[1] - self.mlp_columns[0]

    def kv_of_head(self, group_size: int) -> list[int]:
        """For each local query head, the index of its KV head among this rank's KV heads."""
        return [q // group_size - self.kv_heads[0] for q in range(*self.q_heads)]


@dataclass(frozen=True)
class ShardPlan:
    """Every rank's share of every layer (all layers are split the same way)."""

    n_ranks: int
    shares: tuple[float, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    mlp_alignment: int
    ranks: tuple[RankShare, ...]
    num_layers: int = 0
    private_layers: int = 0  # the master runs this many first and last layers whole
    version: int = PLAN_VERSION

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def shared_layers(self) -> range:
        """The layers split across all ranks (the others are the master's alone)."""
        return range(self.private_layers, self.num_layers - self.private_layers)

    def is_private(self, layer: int) -> bool:
        return layer not in self.shared_layers

    def share(self, rank: int) -> RankShare:
        if not 0 <= rank < self.n_ranks:
            raise PlanError(f"rank {rank} does not exist in a plan of {self.n_ranks} ranks")
        return self.ranks[rank]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ShardPlan:
        values = dict(data)
        if values.get("version") != PLAN_VERSION:
            raise PlanError(f"shard plan version {values.get('version')} is not {PLAN_VERSION}; "
                            "split the model again with this edgetp version")
        values["shares"] = tuple(values["shares"])  # type: ignore[arg-type]
        values["ranks"] = tuple(
            RankShare(r["rank"], tuple(r["q_heads"]), tuple(r["kv_heads"]),  # type: ignore[index]
                      tuple(r["mlp_columns"]))  # type: ignore[index]
            for r in values["ranks"]  # type: ignore[attr-defined]
        )
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TensorSlice:
    """A rank's part of one weight: rows/columns ``[start, stop)`` along ``dim``, or all of it."""

    dim: int | None  # None: the rank holds the whole tensor (norms, row-parallel biases)
    start: int = 0
    stop: int = 0

    def shape_of(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this slice of a tensor of ``shape``."""
        if self.dim is None:
            return shape
        out = list(shape)
        out[self.dim] = self.stop - self.start
        return tuple(out)


def layer_slices(plan: ShardPlan, rank: int, config: ModelConfig) -> dict[str, TensorSlice]:
    """Every tensor of one decoder layer that ``rank`` holds, by name within the layer.

    q/k/v and gate/up are split by output rows (dim 0), o_proj and down_proj by input columns
    (dim 1); their biases stay whole (added once, after the allreduce).
    """
    share, hd = plan.share(rank), plan.head_dim
    q = TensorSlice(0, share.q_heads[0] * hd, share.q_heads[1] * hd)
    kv = TensorSlice(0, share.kv_heads[0] * hd, share.kv_heads[1] * hd)
    mlp = TensorSlice(0, *share.mlp_columns)
    whole = TensorSlice(None)
    out = {"input_layernorm.weight": whole, "post_attention_layernorm.weight": whole}
    for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        out[f"self_attn.{proj}.weight"] = rows
        if config.qkv_bias:
            out[f"self_attn.{proj}.bias"] = rows
    out["self_attn.o_proj.weight"] = TensorSlice(1, q.start, q.stop)
    if config.o_bias:
        out["self_attn.o_proj.bias"] = whole
    for proj in ("gate_proj", "up_proj"):
        out[f"mlp.{proj}.weight"] = mlp
        if config.mlp_bias:
            out[f"mlp.{proj}.bias"] = mlp
    out["mlp.down_proj.weight"] = TensorSlice(1, mlp.start, mlp.stop)
    if config.mlp_bias:
        out["mlp.down_proj.bias"] = whole
    return out


def master_tensors(config: ModelConfig) -> dict[str, list[str]]:
    """Master-only files and the tensors in each (the lm_head is absent when tied)."""
    head = ["norm.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])
    return {"embed": ["embed_tokens.weight"], "head": head}


def parse_shares(text: str | None, n_ranks: int) -> tuple[float, ...]:
    """``"2,1,1"`` -> (2.0, 1.0, 1.0); None -> equal shares."""
    if text is None or text == "":
        return (1.0,) * n_ranks
    try:
        shares = tuple(float(part) for part in text.split(","))
    except ValueError as exc:
        raise PlanError(f"--shares {text!r} must be comma-separated numbers, e.g. 2,1,1") from exc
    if len(shares) != n_ranks:
        raise PlanError(f"--shares gives {len(shares)} values for {n_ranks} nodes")
    return shares


def make_plan(
    config: ModelConfig,
    n_ranks: int,
    shares: Sequence[float] | None = None,
    private_layers: int = 0,
) -> ShardPlan:
    """Split ``config``'s heads and MLP columns over ``n_ranks`` in proportion to ``shares``.

    With ``private_layers`` K, the first K and last K layers stay whole on the master.
    """
    shares = tuple(float(s) for s in (shares or (1.0,) * n_ranks))
    _check_request(config, n_ranks, shares)
    if not 0 <= 2 * private_layers < config.num_hidden_layers:
        raise PlanError(
            f"--private-layers {private_layers} keeps {2 * private_layers} of the model's "
            f"{config.num_hidden_layers} layers on the master and leaves none to share; use at "
            f"most {(config.num_hidden_layers - 1) // 2}"
        )
    q_ranges, kv_ranges = _split_attention(config, shares)
    alignment = mlp_alignment(config.intermediate_size, n_ranks)
    units = apportion(config.intermediate_size // alignment, shares)
    mlp_ranges = [(a * alignment, b * alignment) for a, b in _ranges(units)]
    ranks = tuple(
        RankShare(r, q_ranges[r], kv_ranges[r], mlp_ranges[r]) for r in range(n_ranks)
    )
    return ShardPlan(
        n_ranks=n_ranks,
        shares=shares,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        intermediate_size=config.intermediate_size,
        mlp_alignment=alignment,
        ranks=ranks,
        num_layers=config.num_hidden_layers,
        private_layers=private_layers,
    )


def _check_request(config: ModelConfig, n_ranks: int, shares: tuple[float, ...]) -> None:
    if n_ranks < 1:
        raise PlanError(f"the number of nodes must be at least 1, got {n_ranks}")
    if n_ranks > config.num_attention_heads:
        raise PlanError(
            f"{n_ranks} nodes cannot split a model with {config.num_attention_heads} attention "
            f"heads: every node needs at least one head; use at most "
            f"{config.num_attention_heads} nodes"
        )
    if n_ranks > config.intermediate_size:
        raise PlanError(f"{n_ranks} nodes exceed the {config.intermediate_size} MLP columns")
    if len(shares) != n_ranks:
        raise PlanError(f"{len(shares)} shares given for {n_ranks} nodes")
    bad = [s for s in shares if not s > 0]
    if bad:
        raise PlanError(f"every share must be positive (got {list(shares)}); "
                        "a node with no work should be left out of the cluster")
    if not all(math.isfinite(s) for s in shares):
        raise PlanError(f"every share must be a finite number (got {list(shares)})")


def _split_attention(
    config: ModelConfig, shares: tuple[float, ...]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Query-head and KV-head ranges per rank."""
    group = config.group_size
    if len(shares) <= config.num_key_value_heads:
        kv_ranges = _ranges(apportion(config.num_key_value_heads, shares))
        q_ranges = [(a * group, b * group) for a, b in kv_ranges]
        return q_ranges, kv_ranges
    q_ranges = _ranges(apportion(config.num_attention_heads, shares))
    kv_ranges = [(a // group, (b - 1) // group + 1) for a, b in q_ranges]
    return q_ranges, kv_ranges


def mlp_alignment(intermediate_size: int, n_ranks: int) -> int:
    """Column block size for the MLP split: the largest power of two (<= 128) dividing the MLP
    that leaves at least 8 blocks per rank (so rounding to blocks barely skews the shares),
    else at least one block per rank. Aligned slices suit group-wise quantisation."""
    for min_blocks in (8 * n_ranks, n_ranks):
        for alignment in MLP_ALIGNMENTS:
            if intermediate_size % alignment == 0 and intermediate_size // alignment >= min_blocks:
                return alignment
    return 1


def apportion(total: int, shares: Sequence[float]) -> list[int]:
    """Split ``total`` units in proportion to ``shares``: every part >= 1, parts sum to total.

    Largest-remainder rounding; a part rounded to zero takes a unit from the part that was
    rounded up the most (ties go to the lower rank, so the result is deterministic).
    """
    n = len(shares)
    if total < n:
        raise PlanError(f"cannot give each of {n} nodes at least one of {total} units")
    top = max(shares)
    weights = [s / top for s in shares]  # in (0, 1]: the sum cannot overflow
    weight = sum(weights)
    exact = [total * w / weight for w in weights]
    parts = [int(e) for e in exact]
    by_remainder = sorted(range(n), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    while 0 in parts:
        donor = max((i for i in range(n) if parts[i] > 1), key=lambda i: (parts[i] - exact[i], -i))
        parts[donor] -= 1
        parts[parts.index(0)] = 1
    return parts


def _ranges(parts: Sequence[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for part in parts:
        out.append((start, start + part))
        start += part
    return out
