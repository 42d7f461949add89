"""The planner: memory and latency of a model on a cluster, predicted before anything runs.

Memory is not estimated but derived: the tensors each rank's split would hold come from the
same :func:`~edgetp.shard.plan.make_plan` / :func:`~edgetp.shard.plan.layer_slices` the
splitter uses, the window's blocks and fixed bytes follow the loader's rules
(:class:`~edgetp.parallel.loader.MemoryNeeds`, :func:`~edgetp.parallel.loader.work_bytes`), and
pinning is the window's own :func:`~edgetp.parallel.pinning.choose_pinned`. So the weight bytes,
KV cache bytes and block sizes equal those of a real split exactly (tested).

Time is a model over device profiles (:mod:`edgetp.config.device`, measured by ``edgetp
probe``) and the links: see :mod:`~edgetp.perf.planner.timing`. Prefill is the same per chunk
of the master's prefill size.

The cluster file is the one ``edgetp launch`` reads (:mod:`edgetp.config.cluster`), with a
``profile`` per node (a JSON file from ``edgetp probe`` or inline figures) and a link per node
or for all; for planning alone, ``address`` and ``shard_dir`` may be left out and
``count: 8`` stands for eight identical nodes::

    link: tpi-llm            # a link profile for all nodes (or {latency_ms, bandwidth_mbit})
    wire_dtype: f32          # optional (f32 | bf16 | int8), as `--wire-dtype`
    allreduce: star          # optional (star | ring), as `--allreduce`
    nodes:                   # the first node is the master (rank 0)
      - {name: desktop, profile: desktop.json, memory_budget: 12GiB, share: 2}
      - {name: pi, count: 2, memory_budget: 3GiB, profile: {mem_bw_gbs: 8, disk_bw_mbs: 300}}

The parts, in the order a plan is made:

- :mod:`~edgetp.perf.planner.spec`: the cluster and its nodes' profiles and links (inputs).
- :mod:`~edgetp.perf.planner.storage`: the dtypes a split stores and a run computes in.
- :mod:`~edgetp.perf.planner.rank_files`: the weight files a rank's split holds, by shape.
- :mod:`~edgetp.perf.planner.memory`: one rank's exact bytes and the loader's blocks.
- :mod:`~edgetp.perf.planner.residency`: what stays in memory under a budget, what streams.
- :mod:`~edgetp.perf.planner.timing`: the latency model of one step.
- :mod:`~edgetp.perf.planner.result`: the plan of a cluster (:func:`plan_cluster`) as JSON.
- :mod:`~edgetp.perf.planner.shares`: per-node shares that minimise ms/token.
- :mod:`~edgetp.perf.planner.text`: the plan as ``edgetp plan`` prints it.

It reads the layers below perf (config, shard, parallel) and never the runtime: planning
starts no process and opens no socket.
"""

from __future__ import annotations

from edgetp.perf.planner.memory import LayerPart, RankMemory, prefill_chunk, rank_memory
from edgetp.perf.planner.rank_files import rank_files, safetensors_size
from edgetp.perf.planner.residency import NodePlan, node_plan
from edgetp.perf.planner.result import ClusterPlan, plan_cluster, shares_arg
from edgetp.perf.planner.shares import MIN_GAIN, optimize_shares, simplest_shares
from edgetp.perf.planner.spec import ClusterSpec, NodeSpec, cluster_spec, load_cluster
from edgetp.perf.planner.storage import FLOAT_DTYPES, WEIGHT_DTYPES, Storage
from edgetp.perf.planner.text import render_plan
from edgetp.perf.planner.timing import StepTime, step_time

__all__ = [
    "FLOAT_DTYPES", "MIN_GAIN", "WEIGHT_DTYPES", "ClusterPlan", "ClusterSpec", "LayerPart",
    "NodePlan", "NodeSpec", "RankMemory", "StepTime", "Storage", "cluster_spec", "load_cluster",
    "node_plan", "optimize_shares", "plan_cluster", "prefill_chunk", "rank_files",
    "rank_memory", "render_plan", "safetensors_size", "shares_arg", "simplest_shares",
    "step_time",
]
