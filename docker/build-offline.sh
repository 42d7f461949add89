#!/usr/bin/env bash
# Builds the edgetp image without a registry: the base image from Debian's packages
# (debootstrap, then `docker import`) and the Python packages from a wheelhouse made on this
# host (`pip wheel`: torch 2.13.0 CPU and edgetp's dependencies), then docker/Dockerfile with
# the build arguments that point at both. Each step is skipped when its result is up to date,
# so a second run only rebuilds the layers of what changed.
#
#   docker/build-offline.sh              # from anywhere; needs a running Docker engine, root
#
#   EDGETP_BASE_IMAGE   the base image's tag (default edgetp-base:bookworm)
#   EDGETP_IMAGE        the image's tag (default edgetp:local, what docker/compose.yaml runs)
#   DOCKER              the docker client (default: one that builds with BuildKit)
#   DEBIAN_MIRROR       where debootstrap gets Debian (default http://deb.debian.org/debian)
#   PYTHON              the host's Python 3.11 that makes the wheelhouse (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE="${EDGETP_BASE_IMAGE:-edgetp-base:bookworm}"
IMAGE="${EDGETP_IMAGE:-edgetp:local}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PYTHON="${PYTHON:-python3}"
WHEELHOUSE=docker/wheelhouse
TORCH_VERSION=2.13.0
# what the image's Python needs: the venv, tc for the link profiles, gcc for the decode kernels
BASE_PACKAGES=python3,python3-venv,iproute2,gcc,libc6-dev

say() { echo "build-offline: $*" >&2; }

# A client that builds with BuildKit (it reads docker/Dockerfile.dockerignore): docker with the
# buildx plugin, else Debian's docker.io client, whose BuildKit is built in.
if [ -z "${DOCKER:-}" ]; then
    DOCKER=docker
    if ! docker buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then
        DOCKER=/usr/bin/docker
    fi
fi

make_base_image() {
    if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        say "base image $BASE_IMAGE is there"
        return
    fi
    command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
    local root
    root="$(mktemp -d /var/tmp/edgetp-rootfs.XXXXXX)"
    trap 'rm -rf "$root"' RETURN
    say "debootstrap bookworm ($BASE_PACKAGES) into $root"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$root" "$MIRROR" >&2
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
    say "docker import -> $BASE_IMAGE"
    tar -C "$root" -c . | "$DOCKER" import -c 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
}

make_wheelhouse() {
    # the key: the dependencies asked for and the Python that resolved them
    local key
    key="$(sha256sum pyproject.toml | cut -d' ' -f1) torch==$TORCH_VERSION $("$PYTHON" -V 2>&1)"
    if [ "$(cat "$WHEELHOUSE/.key" 2>/dev/null)" = "$key" ]; then
        say "wheelhouse $WHEELHOUSE is up to date"
        return
    fi
    say "pip wheel: torch==$TORCH_VERSION (CPU) and edgetp's dependencies into $WHEELHOUSE"
    find "$WHEELHOUSE" -name '*.whl' -delete
    "$PYTHON" -m pip wheel --quiet --wheel-dir "$WHEELHOUSE" "torch==$TORCH_VERSION" \
        "setuptools>=64" wheel .
    rm -f "$WHEELHOUSE"/edgetp-*.whl  # the image installs edgetp from its source
    echo "$key" > "$WHEELHOUSE/.key"
}

make_base_image
make_wheelhouse
say "docker build -> $IMAGE"
# --network none: nothing in the build may reach out, so a missing wheel fails here, at once
DOCKER_BUILDKIT=1 "$DOCKER" build --network none --file docker/Dockerfile --tag "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg PIP_SOURCE=wheelhouse .
