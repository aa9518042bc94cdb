"""Load a diffusers pipeline folder onto the worker's device, offline."""

import logging
import time
from pathlib import Path

from handler.model import optimizations
from handler.model.device import Placement, plan_optimizations
from handler.model.pipeline_index import null_components, read_model_index
from handler.core.settings import HandlerSettings

logger = logging.getLogger(__name__)


def load_pipeline(folder: Path, placement: Placement, settings: HandlerSettings = HandlerSettings()):
    """Read the pipeline in ``folder`` and optimize it as the settings ask (``read_pipeline``, then
    ``optimize_pipeline``, for callers with nothing to do between the two)."""
    pipeline = read_pipeline(folder, placement, settings)
    optimize_pipeline(pipeline, placement, settings)
    return pipeline


def read_pipeline(folder: Path, placement: Placement, settings: HandlerSettings = HandlerSettings()):
    """Load the pipeline in ``folder`` with ``local_files_only`` (a worker must never reach a hub), not yet
    placed: what must exist before placing and compiling (LoRA hot-swap slots) is added between the two."""
    from diffusers import DiffusionPipeline

    started = time.perf_counter()
    overrides = null_components(folder)
    if not settings.safety_checker and "safety_checker" in read_model_index(folder):
        overrides.update(safety_checker=None, requires_safety_checker=False)  # skip loading its weights
    pipeline = DiffusionPipeline.from_pretrained(folder, local_files_only=True, dtype=placement.dtype,
                                                 variant=settings.variant or None, **overrides)
    logger.info("read %s from %s as %s in %.2f s", type(pipeline).__name__, folder, placement.dtype,
                time.perf_counter() - started)
    return pipeline


def optimize_pipeline(pipeline, placement: Placement, settings: HandlerSettings) -> None:
    """Place the pipeline and apply the speed/memory options the settings ask for."""
    started = time.perf_counter()
    steps = plan_optimizations(settings, placement)
    for step in steps:
        apply_optimization(pipeline, step, placement, settings)
    logger.info("placed %s on %s with %s in %.2f s", type(pipeline).__name__, placement.device, ", ".join(steps),
                time.perf_counter() - started)


def apply_optimization(pipeline, step: str, placement: Placement, settings: HandlerSettings) -> None:
    """Apply one step of plan_optimizations() to a loaded pipeline."""
    import torch

    on_cuda = placement.device.startswith("cuda")
    if step == "place_on_device":
        pipeline.to(placement.device)
    elif step == "cpu_offload":
        pipeline.enable_model_cpu_offload(device=placement.device)
    elif step == "attention_slicing":
        optimizations.check_attention_slicing(pipeline)
        pipeline.enable_attention_slicing()
    elif step == "channels_last":
        optimizations.denoiser(pipeline).to(memory_format=torch.channels_last)
    elif step == "fuse_qkv":
        optimizations.fuse_qkv(pipeline)
    elif step == "quantization":
        optimizations.quantize(pipeline, settings.quantization, on_cuda)
    elif step == "step_cache":
        optimizations.enable_step_cache(pipeline, settings.step_cache_threshold)
    elif step == "vae_slicing":
        pipeline.vae.enable_slicing()
    elif step == "vae_tiling":
        pipeline.vae.enable_tiling()
    elif step == "tf32":
        optimizations.enable_tf32(on_cuda)
    elif step == "torch_compile":
        optimizations.compile_denoiser(pipeline, settings)
    elif step == "compile_vae":
        optimizations.compile_vae_decoder(pipeline, settings)
    else:
        raise ValueError(f"unknown optimization step {step!r}")
