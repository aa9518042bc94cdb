#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite, serving tests included (12 to 21 minutes on 2 cores).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not serving" for the fast unit tests only.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/setup.sh"
cd "$repo"
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest tests "$@"
