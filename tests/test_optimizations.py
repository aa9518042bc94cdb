"""Device presets: the decisions are pure functions (covered on CPU); CPU-capable options run for real.

CUDA-only paths (float16, cpu_offload) are checked here as decisions only: this machine has no GPU, so
their speed and memory effects are not measured here.
"""

import numpy as np
import pytest
import torch

from handler.model.device import Placement
from handler.model.presets import plan_optimizations
from handler.core.generation import GenerationEngine
from handler.model.loading import load_pipeline
from handler.core.contract import GenerationRequest
from handler.core.settings import HandlerSettings, SettingsError

CPU = Placement("cpu", torch.float32)
CUDA = Placement("cuda:1", torch.float16)


def test_default_plan_only_places_the_pipeline():
    assert plan_optimizations(HandlerSettings(), CPU) == ["place_on_device"]


def test_every_option_is_planned_in_order():
    settings = HandlerSettings(attention="slicing", channels_last=True, vae_slicing=True, vae_tiling=True,
                               torch_compile=True, cpu_offload=True, fuse_qkv=True, quantization="int8wo",
                               step_cache_threshold=0.1, tf32=True, compile_vae=True)
    assert plan_optimizations(settings, CUDA) == ["cpu_offload", "attention_slicing", "channels_last", "fuse_qkv",
                                                  "quantization", "step_cache", "vae_slicing", "vae_tiling", "tf32",
                                                  "torch_compile", "compile_vae"]


def test_cpu_offload_without_cuda_fails_the_load():
    with pytest.raises(RuntimeError, match="cpu_offload needs CUDA"):
        plan_optimizations(HandlerSettings(cpu_offload=True), CPU)


@pytest.mark.parametrize("key, value", [("attention", "flash"), ("compile_mode", "fast")])
def test_unknown_choices_are_rejected(key, value):
    with pytest.raises(SettingsError, match=key):
        HandlerSettings.from_mapping({key: value})


def generate(pipeline) -> np.ndarray:
    request = GenerationRequest(prompt="a cat", negative_prompt=None, num_inference_steps=2, guidance_scale=7.5,
                                width=64, height=64, seeds=(3, 4), scheduler=None)
    return GenerationEngine(pipeline, 10**7).generate([request])[0].images


def test_memory_options_apply_and_keep_the_images(tiny_pipeline_dir):
    plain = generate(load_pipeline(tiny_pipeline_dir, CPU))
    settings = HandlerSettings(attention="slicing", channels_last=True, vae_slicing=True, vae_tiling=True)
    optimized_pipeline = load_pipeline(tiny_pipeline_dir, CPU, settings)
    assert optimized_pipeline.vae.use_slicing and optimized_pipeline.vae.use_tiling
    assert optimized_pipeline.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert optimized_pipeline.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    optimized = generate(optimized_pipeline)
    assert np.abs(plain.astype(int) - optimized.astype(int)).max() <= 2


@pytest.mark.parametrize("pipeline_class, expected", [
    ("StableDiffusionPipeline", torch.float16), ("StableDiffusionXLPipeline", torch.float16),
    ("StableDiffusion3Pipeline", torch.bfloat16), ("FluxPipeline", torch.bfloat16),
])
def test_auto_dtype_on_cuda_follows_the_family(pipeline_class, expected):
    from handler.model.device import choose_placement

    assert choose_placement(HandlerSettings(), True, 0, pipeline_class).dtype == expected
    assert choose_placement(HandlerSettings(), False, None, pipeline_class).dtype == torch.float32


def test_channels_last_applies_to_transformer_families(tmp_path):
    from builder.tiny_pipeline import build_tiny_pipeline

    build_tiny_pipeline(tmp_path / "sd3", "sd3")
    pipeline = load_pipeline(tmp_path / "sd3", CPU, HandlerSettings(channels_last=True))
    assert pipeline.transformer.pos_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    assert generate(pipeline).shape == (2, 64, 64, 3)


def test_warm_up_shapes_follow_the_device_and_compilation():
    """On a CPU without compilation one 64x64 step warms a worker (eager kernels set up once, whatever the
    shape); a compiled or CUDA worker warms at the size requests will use, and the operator's list wins."""
    from handler.model.optimizations import warmup_buckets

    default = HandlerSettings()
    assert warmup_buckets(default, "cpu") == [(64, 64, 1)]
    assert warmup_buckets(default, "cuda:0") == [(default.default_width, default.default_height, 1)]
    compiled = HandlerSettings.from_mapping({"torch_compile": True})
    assert warmup_buckets(compiled, "cpu") == [(default.default_width, default.default_height, 1)]
    listed = HandlerSettings.from_mapping({"compile_warmup_sizes": ["512x512x2"]})
    assert warmup_buckets(listed, "cpu") == [(512, 512, 2)]


def test_compile_freezing_needs_inductor_compilation():
    for settings in ({"compile_freezing": True}, {"compile_freezing": True, "torch_compile": True,
                                                  "compile_backend": "openvino"}):
        with pytest.raises(SettingsError, match="compile_freezing"):
            HandlerSettings.from_mapping(settings)


def test_compile_freezing_is_refused_for_a_model_with_loras(handler_factory, tiny_pipeline_dir, tmp_path):
    from builder.tiny_adapters import make_tiny_lora

    make_tiny_lora(tiny_pipeline_dir, tmp_path / "loras" / "anime.safetensors")
    # Frozen weights are constants of the compiled code: a LoRA applied later would silently change nothing.
    with pytest.raises(SettingsError, match=r"compile_freezing .* packs \['anime'\]"):
        handler_factory({"torch_compile": True, "compile_freezing": True, "lora_dir": str(tmp_path / "loras")})


def test_a_frozen_compiled_unet_makes_the_eager_image(tiny_pipeline_dir):
    import torch._inductor.config

    eager = generate(load_pipeline(tiny_pipeline_dir, CPU))
    try:
        frozen = load_pipeline(tiny_pipeline_dir, CPU, HandlerSettings(torch_compile=True, compile_freezing=True))
        assert torch._inductor.config.freezing
        with torch.inference_mode():  # freezing applies to inference graphs, as the handler runs them
            image = generate(frozen)
    finally:
        torch._inductor.config.freezing = False
    assert np.abs(eager.astype(int) - image.astype(int)).max() <= 2
