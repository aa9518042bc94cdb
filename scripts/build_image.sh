#!/usr/bin/env bash
# Build the serving image from deploy/Dockerfile with podman (no Docker needed), and print its size.
#   scripts/build_image.sh                                    # CPU image, public Python base, PyTorch's CPU wheels
#   scripts/build_image.sh --local-base --torch-wheels /opt/wheels
#                        # no container registry: a Debian bookworm base made here with debootstrap, and torch
#                        # from a folder of wheels (apt and pip still reach Debian and PyPI during the build)
#   scripts/build_image.sh --cuda cu128 --base docker.io/nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
# Options: --tag NAME (default localhost/torchserve-diffusers:cpu, or :cu128 etc. with --cuda);
#   --ca-bundle FILE: the CA certificates pip trusts during the build, for a TLS-inspecting proxy (default: the
#   host pip's PIP_CERT, when set).
# podman, buildah, runc and debootstrap are installed from Debian's packages when missing (as root with
# apt-get). podman reads deploy/containers.conf unless CONTAINERS_CONF names another file.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

base="docker.io/library/python:3.11-slim-bookworm"
local_base=""
variant="cpu"
wheels=""
tag=""
ca_bundle="${PIP_CERT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --local-base) local_base=1; shift ;;
    --base) base="$2"; shift 2 ;;
    --cuda) variant="$2"; shift 2 ;;
    --torch-wheels) wheels="$(cd "$2" && pwd)"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --ca-bundle) ca_bundle="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "build_image: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
tag="${tag:-localhost/torchserve-diffusers:$variant}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$repo/deploy/containers.conf}"

missing=()
for tool in podman buildah runc debootstrap; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "build_image: installing Debian's ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "build_image: ${missing[*]} missing; install them (Debian/Ubuntu: apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

if [ -n "$local_base" ]; then
  base="localhost/debian-bookworm-minbase:latest"
  if ! podman image exists "$base"; then
    rootfs="$(mktemp -d)"
    trap 'rm -rf "$rootfs"' EXIT
    echo "build_image: making $base with debootstrap --variant=minbase bookworm (about 2 minutes)"
    started=$SECONDS
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian | grep -E '^I: (Retriev|Base)' || true
    tar -C "$rootfs" -c . | podman import --quiet - "$base" >/dev/null
    echo "build_image: $base made in $((SECONDS - started)) s"
  fi
fi

args=(--format docker --network host -f deploy/Dockerfile -t "$tag"
      --build-arg "BASE_IMAGE=$base" --build-arg "TORCH_VARIANT=$variant")
if [ -n "$wheels" ]; then
  args+=(--volume "$wheels:/wheels:ro" --build-arg "TORCH_PIP_SOURCE=--find-links /wheels")
fi
if [ -n "$ca_bundle" ]; then
  args+=(--volume "$(realpath "$ca_bundle"):/run/build-ca-bundle.crt:ro" --build-arg "PIP_CERT=/run/build-ca-bundle.crt")
fi
echo "build_image: building $tag from $base (torch: $variant${wheels:+, wheels from $wheels})"
started=$SECONDS
podman build "${args[@]}" .
size=$(podman image inspect --format '{{.Size}}' "$tag")
echo "build_image: $tag built in $((SECONDS - started)) s, $((size / 1000000)) MB"
