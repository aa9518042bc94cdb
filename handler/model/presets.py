"""The registry of speed and memory presets: each one's name, when the settings ask for it, how it is applied.

A new preset is one ``Preset`` line here (and its setting in ``HandlerSettings``); ``plan_optimizations`` and
``loading.optimize_pipeline`` need no change. The order of ``PRESETS`` is the order of application:
quantization comes before compiling (the compiled graph must see the quantized layers), TF32 before compiling
(compiled kernels keep the matmul precision they saw), and the compilations last, so the warm-up generations pay
for them instead of the first requests. SDPA attention is PyTorch's default in diffusers and needs no preset.
"""

from dataclasses import dataclass
from typing import Any, Callable


from handler.core.settings import HandlerSettings
from handler.model import optimizations
from handler.model.device import Placement


@dataclass(frozen=True)
class Preset:
    """One speed or memory option: ``wanted(settings)`` says whether the settings ask for it, ``apply(pipeline,
    placement, settings)`` applies it or raises SettingsError saying why it cannot (never a silent no-op)."""

    name: str
    wanted: Callable[[HandlerSettings], bool]
    apply: Callable[[Any, Placement, HandlerSettings], None]


def _on_cuda(placement: Placement) -> bool:
    return placement.device.startswith("cuda")


PRESETS: tuple[Preset, ...] = (
    Preset("place_on_device", lambda settings: not settings.cpu_offload,
           lambda pipeline, placement, settings: pipeline.to(placement.device)),
    # Model CPU offload moves each component to the GPU only while it runs: it replaces placing the pipeline.
    Preset("cpu_offload", lambda settings: settings.cpu_offload,
           lambda pipeline, placement, settings: pipeline.enable_model_cpu_offload(device=placement.device)),
    Preset("attention_slicing", lambda settings: settings.attention == "slicing",
           lambda pipeline, placement, settings: optimizations.enable_attention_slicing(pipeline)),
    Preset("channels_last", lambda settings: settings.channels_last,
           lambda pipeline, placement, settings: optimizations.to_channels_last(pipeline)),
    Preset("fuse_qkv", lambda settings: settings.fuse_qkv,
           lambda pipeline, placement, settings: optimizations.fuse_qkv(pipeline)),
    Preset("quantization", lambda settings: settings.quantization != "none",
           lambda pipeline, placement, settings: optimizations.quantize(pipeline, settings.quantization,
                                                                        _on_cuda(placement))),
    Preset("step_cache", lambda settings: settings.step_cache_threshold > 0,
           lambda pipeline, placement, settings: optimizations.enable_step_cache(pipeline,
                                                                                 settings.step_cache_threshold)),
    Preset("vae_slicing", lambda settings: settings.vae_slicing,
           lambda pipeline, placement, settings: pipeline.vae.enable_slicing()),
    Preset("vae_tiling", lambda settings: settings.vae_tiling,
           lambda pipeline, placement, settings: pipeline.vae.enable_tiling()),
    Preset("tf32", lambda settings: settings.tf32,
           lambda pipeline, placement, settings: optimizations.enable_tf32(_on_cuda(placement))),
    Preset("torch_compile", lambda settings: settings.torch_compile,
           lambda pipeline, placement, settings: optimizations.compile_denoiser(pipeline, settings)),
    Preset("compile_vae", lambda settings: settings.compile_vae,
           lambda pipeline, placement, settings: optimizations.compile_vae_decoder(pipeline, settings)),
)
PRESET_NAMED = {preset.name: preset for preset in PRESETS}


def plan_optimizations(settings: HandlerSettings, placement: Placement) -> list[str]:
    """The names of the presets to apply, in order, for these settings on this placement."""
    if settings.cpu_offload and not _on_cuda(placement):
        raise RuntimeError("cpu_offload needs CUDA: it moves components to the GPU only while they run")
    return [preset.name for preset in PRESETS if preset.wanted(settings)]


def apply_optimization(pipeline, name: str, placement: Placement, settings: HandlerSettings) -> None:
    """Apply one preset of ``plan_optimizations`` to a loaded pipeline."""
    PRESET_NAMED[name].apply(pipeline, placement, settings)
