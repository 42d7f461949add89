"""Starting a master or a worker the way a user asks for it (the commands' library side).

A master comes from one of three places: the whole model on this machine
(:meth:`Master.local`), a local cluster of N processes on loopback (:class:`LocalCluster`), or
rank 0 of a split, listening for the workers of a cluster of machines (:func:`cluster_master`).
:func:`local_master` picks between the first two the way ``generate``, ``serve`` and ``chat``
do. :func:`master_security` and :func:`worker_security` turn a node's key files (or
``--insecure``) into the CURVE settings it runs with, refusing a non-loopback address without
either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgetp.core.errors import SecurityError

if TYPE_CHECKING:
    from edgetp.net.security import MasterSecurity, WorkerSecurity
    from edgetp.runtime.local import LocalCluster
    from edgetp.runtime.master import Master


@dataclass(frozen=True)
class MasterOptions:
    """How a master computes and talks to its workers (the flags its commands share)."""

    dtype: str = "float32"  # compute dtype
    max_seq_len: int | None = None  # None: what fits the node (edgetp.model.context)
    wire_dtype: str = "f32"
    timeout_s: float = 10.0
    memory_budget: int | None = None  # bytes, per node
    allreduce: str = "star"
    weight_dtype: str | None = None  # a local cluster's split: None keeps the checkpoint's
    group_size: int = 32  # int4's group
    head_dtype: str | None = None  # the lm_head's (edgetp.shard.quant.head_format)
    threads: int | None = None  # per node; None: every core (a local cluster divides them)
    draft: str | None = None  # speculative decoding: "lookup" or a draft model's directory
    draft_tokens: int = 7  # the most tokens a step drafts (speculation.DEFAULT_DRAFT_TOKENS)
    max_batch: int = 1  # sequences decoding together (serve's --max-batch; KV slots per node)


def local_cluster(model_dir: str | Path, nodes: int, shares: tuple[float, ...] | None = None,
                  private_layers: int = 0, options: MasterOptions = MasterOptions()
                  ) -> LocalCluster:
    """A local cluster of ``nodes`` processes on loopback (a context manager of its master)."""
    from edgetp.runtime.local import LocalCluster

    return LocalCluster(model_dir, nodes, shares, dtype=options.dtype,
                        max_seq_len=options.max_seq_len, private_layers=private_layers,
                        wire_dtype=options.wire_dtype, timeout_s=options.timeout_s,
                        memory_budget=options.memory_budget, allreduce=options.allreduce,
                        weight_dtype=options.weight_dtype, group_size=options.group_size,
                        head_dtype=options.head_dtype, threads=options.threads,
                        kv_slots=options.max_batch)


@contextlib.contextmanager
def local_master(model_dir: str | Path, nodes: int = 1, shares: tuple[float, ...] | None = None,
                 private_layers: int = 0, options: MasterOptions = MasterOptions()
                 ) -> Iterator[Master]:
    """The model in one process when nothing asks for more, else a local cluster's master."""
    from edgetp.kernels.threads import use_threads
    from edgetp.runtime.master import Master
    from edgetp.runtime.speculation import check_draft_tokens, draft_model_dir

    if options.draft is not None:  # a bad --draft is said before any worker starts
        draft_model_dir(options.draft)
        check_draft_tokens(options.draft_tokens)
    if (nodes == 1 and private_layers == 0 and options.memory_budget is None
            and options.weight_dtype is None):
        use_threads(options.threads)
        master = Master.local(model_dir, dtype=options.dtype, max_seq_len=options.max_seq_len,
                              max_batch=options.max_batch)
        master.use_draft(options.draft, options.draft_tokens)
        yield master
        return
    with local_cluster(model_dir, nodes, shares, private_layers, options) as master:
        master.use_draft(options.draft, options.draft_tokens)
        yield master


def cluster_master(shard_dir: Path, bind: str, options: MasterOptions,
                   security: MasterSecurity | None) -> Master:
    """The master of a cluster of machines, from rank 0's directory (or the split above it)."""
    from edgetp.kernels.threads import use_threads
    from edgetp.runtime.master import Master
    from edgetp.shard.layout import shard_dir_of

    use_threads(options.threads)
    master = Master.cluster(shard_dir_of(shard_dir), bind, options.dtype, options.max_seq_len,
                            options.wire_dtype, options.timeout_s,
                            memory_budget=options.memory_budget, allreduce=options.allreduce,
                            security=security, max_batch=options.max_batch)
    try:
        master.use_draft(options.draft, options.draft_tokens)
    except BaseException:
        master.close()
        raise
    return master


def master_security(bind: str, key_file: Path | None, authorized: Path | None,
                    insecure: bool) -> MasterSecurity | None:
    """CURVE for a master from its secret key and the workers' public keys, or none."""
    from edgetp.net.security import KeyPair, MasterSecurity, is_loopback

    if key_file and authorized:
        return MasterSecurity(KeyPair.load(key_file), authorized)
    if key_file or authorized:
        raise SecurityError("give both --keys (the master's secret) and --authorized DIR")
    if not insecure and not is_loopback(bind):
        raise SecurityError(f"{bind} is not loopback: give --keys and --authorized (see "
                            "`edgetp keys`), or --insecure on a network you trust")
    return None


def worker_security(address: str, key_file: Path | None, master_key_file: Path | None,
                    insecure: bool) -> WorkerSecurity | None:
    """CURVE for a worker from its secret key and the master's public key, or none."""
    from edgetp.net.security import KeyPair, WorkerSecurity, is_loopback

    if key_file and master_key_file:
        return WorkerSecurity(KeyPair.load(key_file), KeyPair.load(master_key_file).public)
    if key_file or master_key_file:
        raise SecurityError("give both --key (this worker's secret) and --master-key")
    if not insecure and not is_loopback(address):
        raise SecurityError(f"{address} is not loopback: give --key and --master-key (see "
                            "`edgetp keys`), or --insecure on a network you trust")
    return None
