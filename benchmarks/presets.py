"""Measure one preset in this process: load a pipeline folder with some handler settings, warm it up as a
worker does, time a few generations and return the images, so scripts can compare presets in one run.

Used by gpu_check.py (every family, GPU presets) and cpu_presets.py (bfloat16 and OpenVINO on CPU).
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from handler.core.generation import GenerationEngine
from handler.core.requests import GenerationRequest
from handler.core.settings import HandlerSettings
from handler.model.device import Placement
from handler.model.optimizations import compiled_graphs
from handler.service import build_service


@dataclass
class Measured:
    """What one preset gave: the images of the last timed run and every run's seconds."""

    images: np.ndarray
    seconds: list[float]
    load_seconds: float
    warmup_seconds: float
    compiles_after_warmup: int  # graphs compiled by the timed runs: 0 when the warm-up covered them
    peak_memory_bytes: int = 0  # CUDA only
    engine: GenerationEngine = field(repr=False, default=None)
    placement: Placement = None


def generation(width: int, height: int, steps: int, images: int = 1) -> GenerationRequest:
    return GenerationRequest(prompt="a photo of an astronaut riding a horse", negative_prompt=None,
                             num_inference_steps=steps, guidance_scale=7.5, width=width, height=height,
                             seeds=tuple(range(images)), scheduler=None)


def prepare(folder: Path, placement: Placement, values: dict, width: int, height: int) -> Measured:
    """Load ``folder`` with the handler settings ``values`` and warm up at (width, height), as a worker does;
    the result has no timed runs yet."""
    settings = HandlerSettings.from_mapping({"compile_warmup_sizes": [f"{width}x{height}"], **values})
    started = time.perf_counter()
    engine = build_service(folder, settings, placement=placement).engine
    loaded = time.perf_counter()
    engine.warm_up([(width, height, 1)])
    warmed = time.perf_counter()
    return Measured(np.zeros(0), [], loaded - started, warmed - loaded, -compiled_graphs(), engine=engine,
                    placement=placement)


def run_once(measured: Measured, width: int, height: int, steps: int) -> None:
    """Time one generation (in inference mode, as the handler runs it) and keep its images."""
    device = measured.placement.device
    started = time.perf_counter()
    with torch.inference_mode():
        outcome = measured.engine.generate([generation(width, height, steps)])[0]
    if not hasattr(outcome, "images"):
        raise RuntimeError(f"generation failed: {outcome}")
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    measured.seconds.append(time.perf_counter() - started)
    measured.images = outcome.images


def measure(folder: Path, placement: Placement, values: dict, width: int, height: int, steps: int,
            runs: int) -> Measured:
    """Prepare a preset and time ``runs`` generations of ``steps`` steps; count the graphs compiled after
    the warm-up and, on CUDA, the peak memory of the timed runs."""
    measured = prepare(folder, placement, values, width, height)
    measured.compiles_after_warmup = compiled_graphs()
    on_cuda = placement.device.startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(placement.device)
    for _ in range(runs):
        run_once(measured, width, height, steps)
    measured.compiles_after_warmup = compiled_graphs() - measured.compiles_after_warmup
    measured.peak_memory_bytes = torch.cuda.max_memory_allocated(placement.device) if on_cuda else 0
    return measured


def largest_difference(images: np.ndarray, reference: np.ndarray) -> int:
    """The largest difference of any pixel channel (0-255) between two images of the same generation."""
    return int(np.abs(images.astype(int) - reference.astype(int)).max())
