"""Per-model settings: the ``handler:`` section of model-config.yaml, with documented fallbacks.

Every default and limit of the service lives here, in one dataclass, so that the handler, the docs and the
tests read the same numbers: the docstring under each field is its meaning in docs/configuration.md's table
(scripts/gen_docs_tables.py writes it). Unknown keys and out-of-range values fail the model load with a
message that names the key, instead of being ignored.
"""

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

from handler.core.encoding import OUTPUT_FORMATS

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTENTION = ("sdpa", "slicing")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
QUANTIZATIONS = ("none", "int8wo", "fp8")
PROMPT_SYNTAXES = ("plain", "a1111", "compel")  # how prompts are read: handler/core/prompts.py
TRANSLATE_MODES = ("auto", "always", "never")  # auto: prompts with CJK characters, when a translator is packed


class SettingsError(ValueError):
    """A model-config.yaml value that the handler cannot use."""


def parse_bucket(entry) -> Optional[tuple[int, int, int]]:
    """A ``compile_warmup_sizes`` entry, ``"768x768"`` or ``"768x768x2"``, as (width, height, images); None if
    it does not read so."""
    if not isinstance(entry, str):
        return None
    parts = entry.lower().split("x")
    if len(parts) not in (2, 3) or not all(part.isascii() and part.isdigit() for part in parts):
        return None
    width, height, images = (int(part) for part in parts + ["1"][:3 - len(parts)])
    return width, height, images


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SettingsError(f"model-config.yaml handler settings: {message}")


@dataclass(frozen=True)
class HandlerSettings:
    """What a request gets when it leaves a field out, what it may ask for, and how the model runs."""

    default_steps: int = 50
    """`num_inference_steps` when a request leaves it out"""
    default_guidance_scale: float = 7.5
    """`guidance_scale` when left out"""
    default_width: int = 768
    """`width` when left out (text-to-image)"""
    default_height: int = 768
    """`height` when left out (text-to-image)"""
    default_output_format: str = "array"
    """`output_format` when neither the field nor `Accept` names one"""
    default_strength: float = 0.8
    """`strength` for image-to-image and inpainting"""

    max_steps: int = 150
    """largest `num_inference_steps`"""
    max_guidance_scale: float = 30.0
    """largest `guidance_scale`"""
    min_side: int = 64
    """smallest `width`/`height`"""
    max_side: int = 1024
    """largest `width`/`height`"""
    max_pixels: int = 1024 * 1024
    """largest `width * height`"""
    max_images: int = 4
    """largest `num_images`"""
    max_request_pixels: int = 4 * 768 * 768
    """largest `width * height * num_images` of one request"""
    max_batch_pixels: int = 4 * 768 * 768
    """largest `width * height * images` of one pipeline call; larger groups are split"""
    max_prompt_length: int = 2000
    """longest `prompt`/`negative_prompt`, in characters"""
    max_input_image_pixels: int = 4096 * 4096
    """largest input `image`/`mask_image`, checked before decoding"""
    max_generation_seconds: float = 300.0
    """longest a generation may run, and the largest `timeout_seconds` (its default)"""
    max_loras: int = 4
    """most LoRAs one request may name in `loras`"""
    max_loaded_loras: int = 8
    """LoRAs kept loaded in the model (least recently used unloaded); at least `max_loras`"""
    lora_dir: str = ""
    """a folder of LoRA `.safetensors` files (names = file names) read at start-up, beside the packed ones"""
    embedding_dir: str = ""
    """a folder of textual-inversion `.safetensors` embeddings (prompt word = file name) read at start-up, beside the packed ones"""
    max_controlnets: int = 2
    """most ControlNets one request may combine (`controlnet` as a list)"""

    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, or `cuda` (fails the load without CUDA)"""
    dtype: str = "auto"
    """`auto` (float16 on CUDA, float32 on CPU), `float32`, `float16`, `bfloat16`"""
    torch_threads: int = 0
    """torch threads per worker; 0 = cores / live workers"""
    memory_budget_gb: float = 0.0
    """most memory (GB) this model's workers on one host may hold together (RAM; on CUDA, per GPU); 0 = what the
    host has available. A worker that would not fit (its weights in the served dtype + 1 GB working memory) fails
    its load with a message naming both figures, instead of swapping or being OOM-killed"""
    warmup: bool = True
    """run one tiny generation at load, so the first request is not the slowest"""
    attention: str = "sdpa"
    """`sdpa` (PyTorch scaled-dot-product attention, fastest) or `slicing` (less memory, and slower than SDPA: only
    for a GPU too small otherwise; UNet families only, refused at load for SD3 and Flux)"""
    channels_last: bool = False
    """the denoiser (UNet or transformer) and the VAE in channels-last memory format (faster convolutions on CUDA,
    and on CPUs in bfloat16)"""
    torch_compile: bool = False
    """compile the denoiser (UNet or transformer) with `torch.compile` during warm-up (startup takes minutes; raise
    `startupTimeout`); the worker's thread count is then fixed at load"""
    compile_mode: str = "default"
    """`torch.compile` mode: `default`, `reduce-overhead` (CUDA graphs: needs `compile_warmup_sizes`, and other
    shapes are refused with a 400), `max-autotune`"""
    compile_backend: str = "inductor"
    """`torch.compile` backend: `inductor`, or `openvino` on Intel CPUs (needs the optional `openvino` package)"""
    compile_warmup_sizes: tuple = ()
    """shapes the warm-up compiles, as a list of `WIDTHxHEIGHT` or `WIDTHxHEIGHTxIMAGES` (images per call); empty:
    the default size, 1 image. Two or more compile with dynamic shapes, so one graph serves every size and batch"""
    compile_repeated_blocks: bool = False
    """compile only the denoiser's repeated blocks (regional compilation): compiles in seconds instead of minutes,
    nearly the same speed; best for SD3 and Flux"""
    compile_vae: bool = False
    """also compile the VAE decoder, in channels-last"""
    compile_freezing: bool = False
    """with `torch_compile` or `compile_vae` on `inductor`: fold the weights into the compiled code as constants
    (inductor's freezing), so oneDNN lays them out once for the CPU: with `dtype: bfloat16` and `channels_last`,
    the fastest CPU preset measured (see the CPU presets in Performance), at the cost of compiling at start. The
    weights can then never change: refused for a model that packs LoRAs"""
    fuse_qkv: bool = False
    """fuse each attention layer's query/key/value projections into one matmul (denoiser and VAE)"""
    tf32: bool = False
    """TensorFloat-32 matmuls for the float32 parts (the upcast SDXL VAE, float32 models); CUDA only, set before
    compiling"""
    quantization: str = "none"
    """`int8wo` (int8 weights) or `fp8` (float8, GPUs of compute capability 8.9+) for the denoiser through torchao
    (optional package: the load fails with a message naming it when it is missing)"""
    step_cache_threshold: float = 0.0
    """Flux (SD3's pipeline in diffusers 0.42 runs no cache context, so it is refused there): diffusers' first-block
    cache; skip the other blocks on steps where the first block's output changed by less than this (0.05-0.2; 0 =
    off). Faster, but images differ from uncached ones, more as it grows"""
    vae_slicing: bool = False
    """decode a batch's images one at a time (less memory for `num_images` > 1)"""
    vae_tiling: bool = False
    """decode large images in tiles (less memory above 1024 px)"""
    cpu_offload: bool = False
    """keep components on the CPU and move each to the GPU while it runs (CUDA only; for small GPUs)"""
    variant: str = ""
    """load a weights variant, e.g. `fp16` for `*.fp16.safetensors` files (empty: the default weights)"""
    safety_checker: bool = True
    """run the pipeline's safety checker where it has one; `false` disables it (an operator choice, never a request
    field)"""
    prompt_syntax: str = "plain"
    """how prompts are read: `plain` (diffusers, truncated at 77 tokens), `a1111` (AUTOMATIC1111 weights) or
    `compel`; the last two read long prompts in chunks (SD 1/2, SDXL) (docs/prompts.md)"""
    translate: str = "auto"
    """with a translator packed by `build_mar.sh --translator`: `auto` (prompts with CJK characters), `always`,
    `never` (docs/prompts.md)"""

    @classmethod
    def from_mapping(cls, values: Optional[Mapping[str, Any]]) -> "HandlerSettings":
        """Build settings from model-config.yaml's ``handler:`` section (None or {} gives the defaults)."""
        values = dict(values or {})
        known = {field.name: field for field in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SettingsError(
                f"unknown handler setting(s) {unknown} in model-config.yaml; known settings: {sorted(known)}"
            )
        converted = {}
        for name, value in values.items():
            expected = type(known[name].default)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if expected is tuple and isinstance(value, list):  # YAML lists
                value = tuple(value)
            if type(value) is not expected:
                raise SettingsError(
                    f"handler setting {name} must be a {expected.__name__}, got {value!r}"
                )
            converted[name] = value
        settings = cls(**converted)
        settings.check()
        return settings

    def check(self) -> None:
        """Reject combinations that would make the service refuse its own defaults or run unbounded."""
        self._check_choices()
        self._check_compile()
        self._check_limits()

    def _check_choices(self) -> None:
        _require(self.default_output_format in OUTPUT_FORMATS,
                f"default_output_format must be one of {list(OUTPUT_FORMATS)}, got {self.default_output_format!r}")
        _require(self.device in DEVICES, f"device must be one of {list(DEVICES)}, got {self.device!r}")
        _require(self.dtype in DTYPES, f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        _require(self.attention in ATTENTION, f"attention must be one of {list(ATTENTION)}, got {self.attention!r}")
        _require(self.compile_mode in COMPILE_MODES,
                f"compile_mode must be one of {list(COMPILE_MODES)}, got {self.compile_mode!r}")
        _require(self.quantization in QUANTIZATIONS,
                f"quantization must be one of {list(QUANTIZATIONS)}, got {self.quantization!r}")
        _require(0 <= self.step_cache_threshold <= 1,
                f"step_cache_threshold must be 0 (off) to 1, got {self.step_cache_threshold}")
        _require(bool(self.compile_backend), "compile_backend must name a torch.compile backend")
        _require(self.prompt_syntax in PROMPT_SYNTAXES,
                f"prompt_syntax must be one of {list(PROMPT_SYNTAXES)}, got {self.prompt_syntax!r}")
        _require(self.translate in TRANSLATE_MODES,
                f"translate must be one of {list(TRANSLATE_MODES)}, got {self.translate!r}")

    def _check_compile(self) -> None:
        for entry in self.compile_warmup_sizes:
            _require(parse_bucket(entry) is not None,
                    f"compile_warmup_sizes entries must read WIDTHxHEIGHT or WIDTHxHEIGHTxIMAGES (multiples of 8 "
                    f"in min_side..max_side, 1..max_images images), got {entry!r}")
            width, height, images = parse_bucket(entry)
            _require(width % 8 == 0 and height % 8 == 0 and self.min_side <= min(width, height)
                    and max(width, height) <= self.max_side and 1 <= images <= self.max_images,
                    f"compile_warmup_sizes entry {entry!r} is outside min_side..max_side (multiples of 8) or "
                    f"1..max_images images")
        _require(not (self.compile_mode == "reduce-overhead" and self.torch_compile and not self.compile_warmup_sizes),
                "compile_mode reduce-overhead records one CUDA graph per shape: list the shapes it may record in "
                "compile_warmup_sizes (requests at other sizes are refused)")
        _require(not self.compile_freezing or ((self.torch_compile or self.compile_vae)
                                               and self.compile_backend == "inductor"),
                "compile_freezing folds weights into inductor's compiled code: it needs torch_compile or "
                "compile_vae, with compile_backend inductor")
        _require(not (self.compile_mode == "reduce-overhead" and self.compile_repeated_blocks),
                "compile_mode reduce-overhead cannot be combined with compile_repeated_blocks: every copy of a "
                "block would replay one CUDA graph and overwrite the output the next copy reads")

    def _check_limits(self) -> None:
        _require(self.min_side >= 8 and self.min_side % 8 == 0, f"min_side must be a multiple of 8, got {self.min_side}")
        _require(self.max_side >= self.min_side and self.max_side % 8 == 0,
                f"max_side must be a multiple of 8 and at least min_side, got {self.max_side}")
        for name in ("max_steps", "max_images", "max_pixels", "max_request_pixels", "max_batch_pixels",
                     "max_prompt_length", "max_input_image_pixels", "max_controlnets"):
            _require(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        _require(self.max_request_pixels <= self.max_batch_pixels,
                "max_request_pixels must not exceed max_batch_pixels, or a valid request could never run")
        _require(1 <= self.default_steps <= self.max_steps, f"default_steps must be 1..max_steps, got {self.default_steps}")
        _require(0 <= self.max_guidance_scale <= 100, f"max_guidance_scale must be 0..100, got {self.max_guidance_scale}")
        _require(0 <= self.default_guidance_scale <= self.max_guidance_scale,
                f"default_guidance_scale must be 0..max_guidance_scale, got {self.default_guidance_scale}")
        _require(0 < self.default_strength <= 1, f"default_strength must be in (0, 1], got {self.default_strength}")
        _require(self.max_generation_seconds > 0,
                f"max_generation_seconds must be more than 0, got {self.max_generation_seconds}")
        _require(self.max_loras >= 1, f"max_loras must be at least 1, got {self.max_loras}")
        _require(self.max_loaded_loras >= self.max_loras,
                f"max_loaded_loras must be at least max_loras ({self.max_loras}), or one request's LoRAs could not "
                f"all be loaded; got {self.max_loaded_loras}")
        _require(self.torch_threads >= 0, f"torch_threads must be 0 (auto) or more, got {self.torch_threads}")
        _require(self.memory_budget_gb >= 0,
                f"memory_budget_gb must be 0 (what the host has available) or more, got {self.memory_budget_gb}")
        for name in ("default_width", "default_height"):
            side = getattr(self, name)
            _require(side % 8 == 0 and self.min_side <= side <= self.max_side,
                    f"{name} must be a multiple of 8 in min_side..max_side, got {side}")
        _require(self.default_width * self.default_height <= min(self.max_pixels, self.max_request_pixels),
                "default_width x default_height exceeds max_pixels or max_request_pixels")
