#!/usr/bin/env bash
# `make image`: build batcher's image with podman (or docker: CONTAINER_RUNTIME=docker).
# With no BASE given, the base is made from Debian's packages (deploy/image/base.sh), and
# the wheels come from the host's pip into wheelhouse/, so the build needs no registry.
#   deploy/image/build.sh [TAG]
set -euo pipefail
cd "$(dirname "$0")/../.."
tag=${1:-localhost/batcher:latest}
runtime=${CONTAINER_RUNTIME:-podman}
runtime_flags=()
format_flags=()
# Podman's default OCI runtime (crun) refuses hybrid cgroups; runc works (shared/notes).
if [ "$runtime" = podman ] && command -v runc >/dev/null; then runtime_flags=(--runtime runc); fi
# Podman's default OCI image format drops HEALTHCHECK; the Docker format keeps it.
if [ "$runtime" = podman ]; then format_flags=(--format docker); fi
base=${BASE:-}
if [ -z "$base" ]; then
  base=localhost/batcher-base:bookworm
  CONTAINER_RUNTIME=$runtime deploy/image/base.sh "$base"
fi
python=${PYTHON:-.venv/bin/python}
echo "wheels for requirements.txt into wheelhouse/..."
"$python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: -d wheelhouse -r requirements.txt
"$runtime" "${runtime_flags[@]}" build --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  --network none ${format_flags[@]+"${format_flags[@]}"} --build-arg "BASE=$base" --build-arg PIP_NO_INDEX=1 -t "$tag" .
echo "built $tag"
