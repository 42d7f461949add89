"""Operating clusters: starting one on home machines, and emulating one on this machine.

What it owns:

* :mod:`edgetp.ops.launch`: ``edgetp launch`` / ``edgetp status`` over ssh (check the nodes,
  ship each its shard, start and stop the workers, start the master or a detached server);
* :mod:`edgetp.ops.remote`: the node side of launch, the one module that runs on the nodes
  over ssh (sent as ``python -c``; standard library only, since the node may not have edgetp);
* :mod:`edgetp.ops.testbed`: ``edgetp testbed``, a cluster in network namespaces with cgroup
  memory limits (root, Linux), and the Docker compose file rendered from a cluster file;
* :mod:`edgetp.ops.linkemu`: a node's link profile applied with tc (netem, else tbf plus the
  transport's delay), run by the testbeds' entrypoint before edgetp starts.

What it may import: the layers below it (:mod:`edgetp.perf`, :mod:`edgetp.runtime`, and
what those stand on: net, parallel, shard, model, kernels, config, core); not
:mod:`edgetp.cli` (which imports ops) nor its sibling :mod:`edgetp.serve`. Command lines of
``edgetp worker`` / ``edgetp serve`` come from :mod:`edgetp.runtime.commands`, never from
looking at the CLI. The import-linter contract in pyproject.toml holds it to this.
"""
