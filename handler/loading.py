"""Load a diffusers pipeline folder onto the worker's device, offline."""

import logging
import time
from pathlib import Path

from handler.device import Placement

logger = logging.getLogger(__name__)


def load_pipeline(folder: Path, placement: Placement):
    """Load the pipeline in ``folder`` with ``local_files_only`` (a worker must never reach a hub)."""
    from diffusers import DiffusionPipeline

    started = time.perf_counter()
    pipeline = DiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=placement.dtype)
    pipeline.to(placement.device)
    logger.info("loaded %s from %s on %s as %s in %.2f s", type(pipeline).__name__, folder, placement.device,
                placement.dtype, time.perf_counter() - started)
    return pipeline
