#!/usr/bin/env bash
# A Docker engine for the Docker testbed on a machine that has none running (as root, Linux):
#
#   docker/engine.sh install        # Debian's docker.io, docker-compose and debootstrap, if missing
#   docker/engine.sh run CMD ARGS   # CMD with an engine: the one running, else one started for
#                                   # CMD and stopped after it (also on failure or Ctrl-C)
#
# The engine it starts leaves the host's network as it was: --iptables=false (no NAT rules and
# no FORWARD drop policy, which would cut the namespace testbed's bridge), --ip-forward=false
# (containers on one compose network talk over their bridge, which needs no forwarding) and
# --bridge=none (no default docker0 bridge to leave behind; compose makes its own networks and
# removes them). Storage: overlay2 where the kernel has overlayfs, else vfs.
#
#   EDGETP_DOCKERD_LOG   the engine's log (default: build/docker/dockerd.log)
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=build/docker
LOG="${EDGETP_DOCKERD_LOG:-$STATE/dockerd.log}"
PIDFILE="$STATE/dockerd.pid"

say() { echo "engine: $*" >&2; }

engine_answers() { docker info >/dev/null 2>&1; }

install() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 \
        || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ ${#missing[@]} -eq 0 ]; then
        return
    fi
    say "apt-get install ${missing[*]}"
    # no service may start while installing (docker.io's would start an engine with its
    # default firewall rules): policy-rc.d says so, as Debian's container images do
    local policy=/usr/sbin/policy-rc.d added=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 0755 "$policy" && added=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >&2
    if [ -n "$added" ]; then
        rm -f "$policy"
    fi
}

storage_driver() {
    if grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null; then
        echo overlay2
    else
        echo vfs
    fi
}

start() {
    mkdir -p "$STATE"
    local driver
    driver="$(storage_driver)"
    say "starting dockerd ($driver, --iptables=false --ip-forward=false --bridge=none); log: $LOG"
    dockerd --iptables=false --ip-forward=false --bridge=none --storage-driver="$driver" \
        --pidfile "$PIDFILE" >"$LOG" 2>&1 &
    local pid=$! waited=0
    until engine_answers; do
        if ! kill -0 "$pid" 2>/dev/null; then
            say "dockerd exited; its log ends:"; tail -20 "$LOG" >&2; exit 1
        fi
        if [ $waited -ge 120 ]; then
            say "dockerd does not answer after 60 s"; stop "$pid"; exit 1
        fi
        sleep 0.5; waited=$((waited + 1))
    done
    echo "$pid"
}

stop() {
    local pid="$1" waited=0
    say "stopping dockerd ($pid)"
    kill -TERM "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null; do
        if [ $waited -ge 60 ]; then
            say "dockerd did not stop in 30 s: killing it"; kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.5; waited=$((waited + 1))
    done
}

run() {
    if engine_answers; then
        say "using the running engine"
        exec "$@"
    fi
    local status=0
    STARTED_PID="$(start)"
    trap 'stop "$STARTED_PID"' EXIT
    trap 'exit 130' INT TERM HUP
    "$@" || status=$?
    return "$status"
}

case "${1:-}" in
    install) install ;;
    run) shift; [ $# -gt 0 ] || { echo "usage: $0 run CMD [ARGS...]" >&2; exit 2; }; run "$@" ;;
    *) echo "usage: $0 install | run CMD [ARGS...]" >&2; exit 2 ;;
esac
