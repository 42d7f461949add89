"""Emulated home clusters on one machine: the network-namespace testbed and the Docker compose file.

``edgetp testbed --nodes 3 --profile home-wifi --memory-budget 256MiB MODEL_DIR`` (root, Linux):

* a bridge ``etpbr<ID>``; per node k a namespace ``edgetp-<ID>-k`` joined to it by a veth pair
  (``etpv<ID>h<k>`` on the bridge, ``eth0`` inside) with the node's address (default
  ``10.77.0.(k+1)/24``; the bridge has no address, so nothing leaves the namespaces), and a
  cgroup ``edgetp-testbed-<ID>/node-k`` (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``)
  holding the node's ``memory_limit`` (:mod:`.network`, :mod:`.cgroups`);
* every node process starts as ``sh -c 'echo $$ > CG/cgroup.procs && exec "$@"' CG ip netns
  exec NS docker/entrypoint.sh ROLE ...`` (the cgroup is joined first: ``ip netns exec``
  remounts /sys): the Docker testbed's entrypoint, which shapes ``eth0`` with the node's link
  profile (:mod:`edgetp.ops.linkemu`) and execs edgetp (:mod:`.processes`);
* node 0 runs ``edgetp testbed --master-role SPEC``: it waits for the workers, generates the
  prompt greedily, benches a fixed workload into a report (the ``edgetp bench`` machinery) and
  shuts the workers down (:mod:`.master`); the testbed then writes ``testbed.json`` and
  ``testbed.md`` (:mod:`.report`).

Everything created is recorded as it is created and removed on exit, on errors and on
SIGINT/SIGTERM/SIGHUP; ``edgetp testbed --cleanup`` removes leftovers by their names
(:mod:`.resources`). :func:`docker_compose` renders ``docker/compose.yaml`` from a cluster file
(same entrypoint; :mod:`.compose`). :mod:`.run` puts one run together.

``edgetp testbed --docker --config configs/docker-testbed.yaml`` runs the same cluster as the
containers of that compose file instead (:mod:`.dockerrun`, through the docker command line:
:mod:`.containers`) and writes the same report.
"""

from edgetp.ops.testbed.compose import compose_text, docker_compose
from edgetp.ops.testbed.dockerrun import run_docker_testbed
from edgetp.ops.testbed.master import master_role
from edgetp.ops.testbed.report import testbed_markdown
from edgetp.ops.testbed.resources import TestbedError, cleanup_leftovers
from edgetp.ops.testbed.run import TestbedRun, flags_config, run_testbed

__all__ = ["TestbedError", "TestbedRun", "cleanup_leftovers", "compose_text", "docker_compose",
           "flags_config", "master_role", "run_docker_testbed", "run_testbed", "testbed_markdown"]
