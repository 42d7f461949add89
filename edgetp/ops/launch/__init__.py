"""``edgetp launch`` / ``edgetp status``: start, watch and stop a cluster of home machines over SSH.

``edgetp launch CLUSTER.yaml`` (see :mod:`edgetp.config.cluster` for the file):

1. **check** every node with one ssh command each: Python version, edgetp version, free memory
   and disk, rsync, running edgetp processes (:mod:`.nodes`);
2. **split** the model on this machine if ``model`` is a checkpoint (once; cached), or use the
   split ``model`` points at (:mod:`.shipping`);
3. **ship** each node only its own ``rank-K/``, only the files whose sha256 differ, resumable
   (:mod:`.shipping`);
4. **(re)start the workers** detached (``nohup``, own session): ``python -m edgetp.cli worker``,
   output in ``CACHE/logs/CLUSTER-NODE.log``, pid in ``CACHE/run/CLUSTER-NODE.pid`` (CACHE is
   the node's ``cache_dir``, ``~/.cache/edgetp`` by default; :mod:`.layout`);
5. **start the master**: in this process (prompts from ``--prompt`` or standard input), or with
   ``--serve`` ``edgetp serve`` detached on node 0; either way wait until every worker joined
   (:mod:`.launcher`).

``edgetp launch --stop`` stops what the pid files name (only edgetp processes). ``edgetp status``
shows per node: reachable, versions, memory, disk, running processes and the ssh echo round
trip (:mod:`.status`).

Every command on a node goes through :mod:`.shell` (ssh, one shared session per node); what
runs there is :mod:`edgetp.ops.remote`. Command lines of ``edgetp worker`` / ``edgetp serve``
come from :mod:`edgetp.runtime.commands`.
"""

from edgetp.ops.launch.launcher import Launcher
from edgetp.ops.launch.nodes import stop_cluster
from edgetp.ops.launch.shell import LaunchError
from edgetp.ops.launch.status import cluster_status, render_status

__all__ = ["LaunchError", "Launcher", "cluster_status", "render_status", "stop_cluster"]
