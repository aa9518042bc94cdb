#!/usr/bin/env bash
# Two (or more) TorchServe nodes on this machine behind nginx with retry on the other node, and one address for
# several models (docs/several-models.md); see harness/multinode.py.
#   scripts/multinode.sh start [--nodes 2] [--archive model_store/stable_diffusion.mar] [--port 8090]
#   scripts/multinode.sh start --model sd15=model_store/sd15.mar --model sdxl=model_store/sdxl.mar
#   scripts/multinode.sh status | kill-node N | restart-node N | stop        (all take --run-dir DIR first)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
exec "${PYTHON:-$repo/.venv/bin/python}" -m harness.multinode "$@"
