#!/bin/sh
# Start, inspect or stop a cluster of home machines described by a cluster file.
#   launch/cluster.sh configs/home-4node.yaml [--prompt "..."] [--serve]   start it
#   launch/cluster.sh status configs/home-4node.yaml                       what is up
#   launch/cluster.sh stop configs/home-4node.yaml                         stop it
# A thin wrapper over `edgetp launch` / `edgetp status` (see README.md).
set -eu
EDGETP="${EDGETP:-edgetp}"
case "${1:-}" in
    status) shift; exec "$EDGETP" status "$@" ;;
    stop) shift; exec "$EDGETP" launch --stop "$@" ;;
    ""|-h|--help) exec "$EDGETP" launch --help ;;
    *) exec "$EDGETP" launch "$@" ;;
esac
