#!/bin/sh
# An emulated cluster on this Linux machine, as root: N network namespaces on a bridge, each
# node's link shaped by a profile and its memory capped by a cgroup; the master in one of them.
#   sudo launch/netns-testbed.sh --nodes 3 --profile home-wifi --memory-budget 256MiB MODEL_DIR
#   sudo launch/netns-testbed.sh --config configs/local-testbed.yaml
#   sudo launch/netns-testbed.sh --cleanup       # remove leftovers of an interrupted run
# A thin wrapper over `edgetp testbed` (see README.md).
set -eu
EDGETP="${EDGETP:-edgetp}"
exec "$EDGETP" testbed "$@"
