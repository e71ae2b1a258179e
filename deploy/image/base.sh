#!/usr/bin/env bash
# A local base image for the Dockerfile where no container registry is reachable: Debian
# bookworm (its python3 is 3.11, like python:3.11-slim) built from Debian's own packages
# with debootstrap, imported into podman as localhost/batcher-base:bookworm.
#   deploy/image/base.sh [IMAGE]
set -euo pipefail
image=${1:-localhost/batcher-base:bookworm}
runtime=${CONTAINER_RUNTIME:-podman}
if $runtime image exists "$image" 2>/dev/null; then
  echo "base image $image already exists"
  exit 0
fi
if ! command -v debootstrap >/dev/null; then
  echo "base.sh needs debootstrap: sudo apt-get install debootstrap (or BASE=python:3.11-slim make image, with a registry)" >&2
  exit 1
fi
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm from $mirror (a few minutes)..."
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | $runtime import - "$image" >/dev/null
echo "base image $image ready"
