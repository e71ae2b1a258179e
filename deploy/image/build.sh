#!/usr/bin/env bash
# `make image`: build batcher's image with podman (or docker: CONTAINER_RUNTIME=docker).
# With no BASE given, the base is made from Debian's packages (deploy/image/base.sh), and
# the wheels come from the host's pip into wheelhouse/, so the build needs no registry.
# Needs podman and runc (or docker), and debootstrap without BASE: installed here with
# apt-get when run as root on Debian or Ubuntu, else named in one line.
#   deploy/image/build.sh [TAG]
set -euo pipefail
cd "$(dirname "$0")/../.."
tag=${1:-localhost/batcher:latest}
runtime=${CONTAINER_RUNTIME:-podman}
missing=()
if ! command -v "$runtime" >/dev/null; then missing+=("$([ "$runtime" = docker ] && echo docker.io || echo "$runtime")"); fi
if [ "$runtime" = podman ] && ! command -v runc >/dev/null; then missing+=(runc); fi
if [ -z "${BASE:-}" ] && ! command -v debootstrap >/dev/null; then missing+=(debootstrap); fi
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing ${missing[*]} with apt-get..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "make image needs ${missing[*]}: sudo apt-get install ${missing[*]} (or your system's packages)" >&2
    exit 1
  fi
fi
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
echo "wheels for requirements.txt and the wheel's build backend into wheelhouse/..."
backend=$(grep -o '^hatchling==[^ ]*' requirements-dev.txt)
"$python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: -d wheelhouse \
  -r requirements.txt "$backend"
"$runtime" "${runtime_flags[@]}" build --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  --network none ${format_flags[@]+"${format_flags[@]}"} --build-arg "BASE=$base" --build-arg PIP_NO_INDEX=1 -t "$tag" .
echo "built $tag"
