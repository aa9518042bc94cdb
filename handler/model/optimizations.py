"""How the speed presets of model-config.yaml apply to a loaded pipeline: compilation, fused projections, TF32,
quantization, the step cache (the registry of presets, and their order, is ``handler/model/presets.py``).

Each function either applies its preset or raises SettingsError saying why it cannot apply to this pipeline or
device, so that a preset never silently does nothing.
"""

import importlib
import logging

import torch

from handler.core.settings import HandlerSettings, SettingsError, parse_bucket

logger = logging.getLogger(__name__)

# Pipelines whose transformer has diffusers' cache hooks and whose call sets their cache context: in diffusers
# 0.42 Flux only (SD3's pipeline runs its transformer outside any cache context, so the hook cannot run).
STEP_CACHE_PIPELINES = ("FluxPipeline",)
# torch.compile backends that live in an optional package, registered when it is imported.
BACKEND_MODULES = {"openvino": "openvino.torch"}
SMALLEST_WARMUP = 64  # a side every family accepts (a multiple of 16)


def denoiser(pipeline):
    """The network run at every step: the UNet (SD 1/2, SDXL) or the transformer (SD3, Flux)."""
    unet = getattr(pipeline, "unet", None)
    return unet if unet is not None else pipeline.transformer


def warmup_buckets(settings: HandlerSettings, device: str = "cuda") -> list[tuple[int, int, int]]:
    """The (width, height, images) shapes the warm-up generates: the operator's list, else the default size;
    on a CPU without compilation the smallest size (64x64). Eager CPU kernels set themselves up once whatever
    the shape, so a 64x64 step makes the first request as fast as the next (measured on a full-size SD 1.5 by
    benchmarks/realscale.py), while a default-size warm-up there takes minutes of a cold start."""
    buckets = [parse_bucket(entry) for entry in settings.compile_warmup_sizes]
    if buckets:
        return buckets
    if device == "cpu" and not (settings.torch_compile or settings.compile_vae):
        return [(SMALLEST_WARMUP, SMALLEST_WARMUP, 1)]
    return [(settings.default_width, settings.default_height, 1)]


def to_channels_last(pipeline) -> None:
    """The denoiser and the VAE in channels-last memory format: their convolutions run faster so on GPUs and
    on CPUs with oneDNN (full-size SD 1.5 in bfloat16 on this project's CPU: the VAE decode 1.4x faster,
    benchmarks/realscale.py)."""
    denoiser(pipeline).to(memory_format=torch.channels_last)
    pipeline.vae.to(memory_format=torch.channels_last)


def enable_attention_slicing(pipeline) -> None:
    """Attention slicing exists for UNets only; on SD3's and Flux's transformers it would do nothing."""
    model = denoiser(pipeline)
    if not hasattr(model, "set_attention_slice"):
        raise SettingsError(
            f"attention: slicing is not available for {type(model).__name__} ({type(pipeline).__name__}): it has "
            "no sliced attention. Use vae_slicing / vae_tiling or cpu_offload to save memory, or attention: sdpa")
    pipeline.enable_attention_slicing()


def fuse_qkv(pipeline) -> None:
    """One matmul for the query, key and value projections of every attention layer (denoiser and VAE)."""
    model = denoiser(pipeline)
    if not hasattr(model, "fuse_qkv_projections"):
        raise SettingsError(f"fuse_qkv is not available for {type(model).__name__}")
    model.fuse_qkv_projections()
    if hasattr(pipeline.vae, "fuse_qkv_projections"):
        pipeline.vae.fuse_qkv_projections()


def enable_tf32(on_cuda: bool) -> None:
    """TensorFloat-32 matmuls and convolutions for the parts that run in float32 (the upcast VAE, fp32
    models). Set before compiling: compiled kernels keep the precision they were compiled with."""
    if not on_cuda:
        raise SettingsError("tf32 needs CUDA (Ampere or newer): it is a GPU matmul precision")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def quantize(pipeline, kind: str, on_cuda: bool) -> None:
    """Quantize the denoiser's linear layers through torchao: ``int8wo`` (int8 weights, computed in the
    pipeline's dtype) or ``fp8`` (float8 weights and activations; CUDA with compute capability 8.9+)."""
    try:
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig,
                                          quantize_)
    except ImportError as error:
        raise SettingsError(f"quantization: {kind} needs the torchao package (pip install torchao, the version "
                            f"in constraints.txt): {error}") from error
    if kind == "fp8" and not (on_cuda and torch.cuda.get_device_capability() >= (8, 9)):
        raise SettingsError("quantization: fp8 needs a CUDA GPU with compute capability 8.9 or newer "
                            "(Ada, Hopper); use int8wo elsewhere")
    config = Int8WeightOnlyConfig() if kind == "int8wo" else Float8DynamicActivationFloat8WeightConfig()
    quantize_(denoiser(pipeline), config)


def enable_step_cache(pipeline, threshold: float) -> None:
    """diffusers' first-block cache: when the first transformer block's output changed by less than
    ``threshold`` since the last step, the other blocks are skipped and their last residual reused.

    It trades quality for speed: images differ from the uncached ones, more as the threshold grows.
    """
    from diffusers.hooks import FirstBlockCacheConfig

    if type(pipeline).__name__ not in STEP_CACHE_PIPELINES:
        raise SettingsError(f"step_cache_threshold is available for {', '.join(STEP_CACHE_PIPELINES)} only; "
                            f"{type(pipeline).__name__} in this diffusers version runs no cache context")
    pipeline.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))


def compile_backend(settings: HandlerSettings):
    """The torch.compile backend named in the settings, importing the package that registers it."""
    name = settings.compile_backend
    if name in BACKEND_MODULES:
        try:
            importlib.import_module(BACKEND_MODULES[name])
        except ImportError as error:
            raise SettingsError(f"compile_backend: {name} needs the {name} package (the version in "
                                f"constraints.txt): {error}") from error
    if name not in torch._dynamo.list_backends(exclude_tags=()):
        raise SettingsError(f"compile_backend {name!r} is not a torch.compile backend; available: "
                            f"{sorted(torch._dynamo.list_backends())}")
    return name


def compile_options(settings: HandlerSettings) -> dict:
    """torch.compile arguments. Several warm-up buckets compile with dynamic shapes, so one graph serves
    every size and batch; one bucket compiles for exactly that shape (the fastest code), and a request at
    another shape then recompiles once, with dynamic shapes.

    ``compile_freezing`` is inductor's process-wide ``freezing`` switch (torch.compile takes a mode or inductor
    options, not both): a worker serves one model, so every graph it compiles follows that model's settings."""
    options = {"backend": compile_backend(settings),
               "dynamic": True if len(warmup_buckets(settings)) > 1 else None}
    if options["backend"] == "inductor":
        options["mode"] = settings.compile_mode
        import torch._inductor.config

        torch._inductor.config.freezing = settings.compile_freezing
    return options


def compile_denoiser(pipeline, settings: HandlerSettings) -> None:
    """Compile the denoiser whole, or with ``compile_repeated_blocks`` only its repeated blocks (regional
    compilation: one compiled block serves all its copies, so compiling takes seconds instead of minutes)."""
    options = compile_options(settings)
    model = denoiser(pipeline)
    if settings.compile_repeated_blocks:
        blocks = [module for module in model.modules()
                  if type(module).__name__ in (getattr(model, "_repeated_blocks", None) or ())]
        blocks = blocks or list(getattr(model, "transformer_blocks", ()))  # SD3 names no repeated blocks
        if not blocks:
            raise SettingsError(f"compile_repeated_blocks: {type(model).__name__} has no repeated blocks")
        for block in blocks:
            block.compile(**options)
        return
    # In place (nn.Module.compile), so the pipeline keeps the module itself: LoRA loading and hot-swap find
    # their adapters on it, which a torch.compile() wrapper would hide.
    model.compile(**options)
    model._compiled_call_impl = _outside_the_graph(model._compiled_call_impl, settings.compile_mode)


def compile_vae_decoder(pipeline, settings: HandlerSettings) -> None:
    """Compile the VAE's decoder, in channels-last (its convolutions run faster so on GPUs)."""
    pipeline.vae.to(memory_format=torch.channels_last)
    pipeline.vae.decoder.compile(**compile_options(settings))


def _outside_the_graph(compiled_call, compile_mode: str):
    """Wrap the compiled call that nn.Module.compile() keeps in ``_compiled_call_impl`` with the work that
    must run before and after the graph, uncompiled (forward hooks would be compiled into it)."""
    def call(*args, **kwargs):
        args, kwargs = _float_timestep(args, kwargs)
        output = compiled_call(*args, **kwargs)
        return _cloned_output(output) if compile_mode == "reduce-overhead" else output
    return call


def _float_timestep(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Pass the timestep as float32 whatever the scheduler gives: DDIM and PNDM give integers, Euler floats,
    and a compiled graph guards on the dtype, so switching schedulers would recompile. The timestep
    embedding converts to float first, so the numbers are the same."""
    if len(args) > 1 and _integer_tensor(args[1]):
        args = (args[0], args[1].float(), *args[2:])
    if _integer_tensor(kwargs.get("timestep")):
        kwargs = {**kwargs, "timestep": kwargs["timestep"].float()}
    return args, kwargs


def _integer_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and not value.is_floating_point()


def _cloned_output(output):
    """Copy the denoiser's output out of the CUDA graph's memory, which the next replay overwrites: PNDM
    keeps earlier outputs across steps, and without classifier-free guidance they would be the raw output."""
    if isinstance(output, tuple):
        return tuple(item.clone() if isinstance(item, torch.Tensor) else item for item in output)
    if hasattr(output, "sample"):
        output.sample = output.sample.clone()
    return output


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (each recompile adds one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
