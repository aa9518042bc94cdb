#!/usr/bin/env bash
# Build model_store/<name>.mar (or a no-archive folder) from a diffusers pipeline.
#   ./build_mar.sh --tiny                          # tiny random-weight pipeline, offline
#   ./build_mar.sh --model-dir /path/to/pipeline   # a local diffusers folder (one pipeline; a folder holding
#                                                  # several is refused with the list of them)
#   ./build_mar.sh --model-id stabilityai/stable-diffusion-2-1 [--revision main]
#   ./build_mar.sh --checkpoint model.safetensors [--config-from DIR_OR_HUB_ID]   # a single-file checkpoint
#                                                  # (civitai, AUTOMATIC1111), converted once; see docs/models.md
# An existing model_store/<name>.mar (or <name>/ folder) is never overwritten without --force:
#   ./build_mar.sh --tiny --force                  # rebuild model_store/stable_diffusion.mar
#   ./build_mar.sh --tiny --controlnet edges=build/cn-sd1   # pack ControlNets (repeatable), checked to fit
# Pack a translation model (prompts in Chinese etc. are translated first; see docs/prompts.md):
#   ./build_mar.sh --tiny --translator /path/to/opus-mt-zh-en
# Options: --name NAME, --archive-format zip|no-archive, --config-file FILE, --export-path DIR, --force (see --help).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m builder.build_mar "$@"
