#!/usr/bin/env bash
# `make base-image`: a Debian 12 (bookworm, Python 3.11) image NAME for deploy/Dockerfile's
# BASE_IMAGE, made with debootstrap from Debian's mirror and imported into the local Docker
# engine: for hosts that reach Debian's mirror but no image registry. Root (debootstrap).
# An image NAME already in the engine is kept as it is.
set -euo pipefail
NAME=${1:-imagepipe-base:bookworm}
DOCKER=${DOCKER:-docker}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if "$DOCKER" image inspect "$NAME" >/dev/null 2>&1; then
    echo "base image $NAME is already there"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install -y debootstrap" >&2; exit 2; }
root=$(mktemp -d "${TMPDIR:-/tmp}/imagepipe-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
# minbase: essential packages and apt only; the Dockerfile adds git.
nice -n 10 debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$root/rootfs" "$MIRROR"
rm -rf "$root"/rootfs/var/cache/apt/archives/*.deb "$root"/rootfs/var/lib/apt/lists/*
tar -C "$root/rootfs" -c . | "$DOCKER" import -c 'CMD ["/bin/bash"]' - "$NAME"
echo "imported $NAME"
