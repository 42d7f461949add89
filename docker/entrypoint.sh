#!/bin/sh
# The entrypoint of both testbeds: the Docker one (docker/compose.yaml) and the network-namespace
# one (`edgetp testbed`, which runs this script inside each namespace). It shapes this node's
# link with its profile (tc: netem where the kernel has it, else tbf plus edgetp's transport
# delay; see edgetp/ops/linkemu.py), then runs `edgetp ARGS...` in its place.
#
#   EDGETP_LINK_PROFILE   profile name (tpi-llm, home-wifi, gigabit, or one of
#                         EDGETP_LINK_PROFILES); unset or empty: no emulation
#   EDGETP_LINK_PROFILES  YAML file of link profiles (default: edgetp's built-in ones)
#   EDGETP_LINK_DEV       interface to shape (default: eth0)
#   EDGETP_PYTHON         the interpreter that has edgetp installed (default: python3)
set -eu

PYTHON="${EDGETP_PYTHON:-python3}"

if [ -n "${EDGETP_LINK_PROFILE:-}" ]; then
    # prints `export EDGETP_LINK_EMULATION=... EDGETP_LINK_DELAY_MS=...` lines (shell-quoted)
    exports="$("$PYTHON" -m edgetp.ops.linkemu apply --profile "$EDGETP_LINK_PROFILE" \
        --dev "${EDGETP_LINK_DEV:-eth0}")"
    eval "$exports"
else
    export EDGETP_LINK_EMULATION="${EDGETP_LINK_EMULATION:-none}"
fi

exec "$PYTHON" -m edgetp.cli "$@"
