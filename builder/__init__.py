"""The build side (build_mar.sh and the tiny pipelines), never shipped in an archive."""

import handler  # noqa: F401  (its torchao log filter must be in place before the builder imports diffusers)
