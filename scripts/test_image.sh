#!/usr/bin/env bash
# Build the serving image with docs/deploying.md's commands, run it, serve the tiny archive and stop it with a
# generation in flight (tests/test_image.py). Minutes on 2 cores: the first build also makes the Debian base.
# Needs root and apt-get (podman, buildah, runc, debootstrap come from Debian). Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export HF_HUB_OFFLINE=1 RUN_IMAGE_TEST=1
exec .venv/bin/python -m pytest tests/test_image.py -s "$@"
