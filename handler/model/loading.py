"""Load a diffusers pipeline folder onto the worker's device, offline."""

import logging
import time
from pathlib import Path
from typing import Callable, Optional

from handler.model.device import Placement, plan_optimizations
from handler.model.pipeline_index import null_components, read_model_index
from handler.core.settings import HandlerSettings

logger = logging.getLogger(__name__)


def load_pipeline(folder: Path, placement: Placement, settings: HandlerSettings = HandlerSettings(),
                  prepare: Optional[Callable] = None):
    """Load the pipeline in ``folder`` with ``local_files_only`` (a worker must never reach a hub), place it
    and apply the speed/memory options the settings ask for.

    ``prepare(pipeline)`` runs before placing and compiling (LoRA hot-swap slots must exist before compiling)."""
    from diffusers import DiffusionPipeline

    started = time.perf_counter()
    overrides = null_components(folder)
    if not settings.safety_checker and "safety_checker" in read_model_index(folder):
        overrides.update(safety_checker=None, requires_safety_checker=False)  # skip loading its weights
    pipeline = DiffusionPipeline.from_pretrained(folder, local_files_only=True, dtype=placement.dtype,
                                                 variant=settings.variant or None, **overrides)
    if prepare is not None:
        prepare(pipeline)
    steps = plan_optimizations(settings, placement)
    for step in steps:
        apply_optimization(pipeline, step, placement, settings)
    logger.info("loaded %s from %s on %s as %s with %s in %.2f s", type(pipeline).__name__, folder,
                placement.device, placement.dtype, ", ".join(steps), time.perf_counter() - started)
    return pipeline


def apply_optimization(pipeline, step: str, placement: Placement, settings: HandlerSettings) -> None:
    """Apply one step of plan_optimizations() to a loaded pipeline."""
    import torch

    if step == "place_on_device":
        pipeline.to(placement.device)
    elif step == "cpu_offload":
        pipeline.enable_model_cpu_offload(device=placement.device)
    elif step == "attention_slicing":
        pipeline.enable_attention_slicing()
    elif step == "channels_last":
        denoiser(pipeline).to(memory_format=torch.channels_last)
    elif step == "vae_slicing":
        pipeline.vae.enable_slicing()
    elif step == "vae_tiling":
        pipeline.vae.enable_tiling()
    elif step == "torch_compile":
        # In place (nn.Module.compile), so the pipeline keeps the module itself: LoRA loading and hot-swap
        # find their adapters on it, which a torch.compile() wrapper would hide.
        denoiser(pipeline).compile(mode=settings.compile_mode)
    else:
        raise ValueError(f"unknown optimization step {step!r}")


def denoiser(pipeline):
    """The network run at every step: the UNet (SD 1/2, SDXL) or the transformer (SD3, Flux)."""
    unet = getattr(pipeline, "unet", None)
    return unet if unet is not None else pipeline.transformer
