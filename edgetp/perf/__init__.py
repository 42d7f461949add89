"""edgetp.perf: performance measured and predicted.

It owns the benchmark workload and its reports (``bench``: a fixed workload on a local
cluster or a testbed's; ``report``: JSON, Markdown and a Chrome trace; ``charts``: PNG), the
device probe (``probe``: what ``edgetp probe`` measures, written as a device profile), the
published model configurations (``presets``) and the planner (``planner``: memory per node,
TTFT and ms/token predicted before anything runs).

It may import ``edgetp.runtime`` and the layers below it (parallel, net, shard, model,
kernels, config, core), never ops, serve or the CLI. The planner reads only config, core,
shard and parallel: planning starts no process and opens no socket (a contract in
pyproject.toml checks it). The profile format itself is :mod:`edgetp.config.device`'s.
"""
