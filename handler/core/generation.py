"""Run validated requests through the diffusers pipeline: group, generate, and keep failures per request.

Requests that can share a pipeline call (same task, size, steps, guidance, scheduler) are grouped, and each
group runs once, up to a pixel budget per call. Each image gets its own CPU ``torch.Generator`` seeded with
its seed, so an image is the same whether its request ran alone or batched, on CPU or GPU.
"""

import gc
import inspect
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from handler.core.capabilities import IMAGE_TO_IMAGE, INPAINTING, TEXT_TO_IMAGE
from handler.core.requests import GenerationRequest
from handler.core.controlnets import control_arguments, controlnet_pipeline
from handler.core.failures import INTERNAL_ERROR, INVALID_FIELD, OUT_OF_MEMORY, TIMEOUT, Rejection
from handler.core.previews import LatentPreviewer
from handler.core.progress import DeadlineExceeded, Progress, StepWatcher, Watched
from handler.core.prompts import PromptEncoder, rejection_for
from handler.core.schedulers import SchedulerFactory, scheduler_name_of

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """The images of one request (uint8, N x H x W x 3) and how long their pipeline call took."""

    request: GenerationRequest
    images: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)
    nsfw: Optional[list[bool]] = None
    scheduler: Optional[str] = None  # the scheduler that ran, by its request name
    model: Optional[str] = None  # the served model's name (image metadata: A1111's "Model")
    lora_hashes: dict[str, str] = field(default_factory=dict)  # LoRA name -> A1111's short hash of its file

    def parameters(self) -> dict[str, Any]:
        """The generation parameters a client needs to make the same images again."""
        request = self.request
        parameters = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "num_inference_steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale,
            "width": request.width,
            "height": request.height,
            "seeds": list(request.seeds),
            "scheduler": self.scheduler,
            "task": request.task,
        }
        if request.strength is not None:
            parameters["strength"] = request.strength
        if self.model is not None:
            parameters["model"] = self.model
        if request.loras:
            parameters["loras"] = [{"name": name, "scale": scale} for name, scale in request.loras]
        if self.lora_hashes:
            parameters["lora_hashes"] = dict(self.lora_hashes)
        if request.prompt_translated is not None:
            parameters["prompt_translated"] = request.prompt_translated
        if request.negative_prompt_translated is not None:
            parameters["negative_prompt_translated"] = request.negative_prompt_translated
        if request.control is not None:
            parameters.update(request.control.parameters())
        return parameters


def plan_groups(requests: list[GenerationRequest], max_batch_pixels: int,
                keys: Optional[list[tuple]] = None) -> list[list[int]]:
    """Indices of ``requests`` grouped into pipeline calls: equal batch keys, at most ``max_batch_pixels``.

    ``keys``: each request's key, when the engine adds to ``batch_key()`` (the prompt's chunk count).
    Groups keep the order in which their first request arrived.
    """
    by_key: dict[tuple, list[list[int]]] = {}
    for index, request in enumerate(requests):
        chunks = by_key.setdefault(keys[index] if keys is not None else request.batch_key(), [[]])
        current = chunks[-1]
        used = sum(requests[i].pixels for i in current)
        if current and used + request.pixels > max_batch_pixels:
            current = []
            chunks.append(current)
        current.append(index)
    return [chunk for chunks in by_key.values() for chunk in chunks]


class GenerationEngine:
    """Owns the loaded pipeline and the task pipelines that share its weights."""

    def __init__(self, pipeline, max_batch_pixels: int,
                 on_call: Optional[Callable[[int, int, float], None]] = None, safety_checker: bool = True,
                 loras=None, prompt_encoder: Optional[PromptEncoder] = None, controlnets: Optional[dict] = None,
                 call_shapes: Optional[frozenset] = None, model_name: Optional[str] = None, ip_adapters=None):
        """``on_call(images, pixel_steps, seconds)`` is told about every successful pipeline call (metrics).
        ``safety_checker=False`` runs a pipeline that has one without it (an operator's choice).
        ``loras``: the LoraAdapters (handler/model/adapters.py) that switch LoRA sets per call, if any.
        ``prompt_encoder``: reads prompts in a weighting syntax, long ones in chunks (None: the pipeline's text).
        ``controlnets``: the loaded ControlNet models by name, for requests that name them.
        ``ip_adapters``: the IpAdapters (handler/model/ip_adapters.py) loaded into the UNet, if any.
        ``call_shapes``, a set of (width, height, images), bounds the calls to those shapes (CUDA graphs keep
        one recording per shape, so an unbounded set of shapes would use unbounded memory).
        ``model_name``: the served model's name, which results carry into the images' metadata."""
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        self.max_batch_pixels = max_batch_pixels
        self.on_call = on_call
        self.loras = loras
        self.prompt_encoder = prompt_encoder
        self.ip_adapters = ip_adapters
        self.call_shapes = call_shapes
        self.model_name = model_name
        self._schedulers = SchedulerFactory(pipeline.scheduler)
        self._default_scheduler = scheduler_name_of(pipeline.scheduler)
        self._previewer = None  # fitted on the first request that asks for previews
        self._safety_checker = safety_checker
        self._task_pipelines = {TEXT_TO_IMAGE: _task_pipeline(pipeline, safety_checker)}
        self._controlnets = dict(controlnets or {})
        # (task, ControlNet names) -> TaskPipeline, built on first use: the combinations a client may name are
        # bounded by tasks x ordered choices of at most max_controlnets names.
        self._controlnet_pipelines: dict[tuple, TaskPipeline] = {}
        for task, auto_class in ((IMAGE_TO_IMAGE, AutoPipelineForImage2Image),
                                 (INPAINTING, AutoPipelineForInpainting)):
            try:
                self._task_pipelines[task] = _task_pipeline(auto_class.from_pipe(pipeline), safety_checker)
            except (ValueError, KeyError) as error:
                logger.info("%s is not available for %s: %s", task, type(pipeline).__name__, error)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this pipeline can run (image-to-image and inpainting exist for most families)."""
        return tuple(self._task_pipelines)

    def warm_up(self, buckets: list[tuple[int, int, int]]) -> None:
        """One single-step generation per (width, height, images) bucket, so the first client requests do not
        pay for lazy initialisation (and, with torch_compile, for compiling at the shapes they use). It runs in
        inference mode like requests do: a compiled graph guards on it and would compile again."""
        for width, height, images in buckets:
            started = time.perf_counter()
            request = GenerationRequest(prompt="warm-up", negative_prompt=None, num_inference_steps=1,
                                        guidance_scale=7.5, width=width, height=height, seeds=tuple(range(images)),
                                        scheduler=None)
            with torch.inference_mode():
                self._call_pipeline([request])
            logger.info("warm-up generation at %dx%d, %d image(s) took %.2f s", width, height, images,
                        time.perf_counter() - started)

    def generate(self, items: list, on_progress: Optional[Callable[[int, Progress], None]] = None,
                 received: Optional[float] = None) -> list:
        """Map each GenerationRequest to a GenerationResult or Rejection; pass anything else through.

        ``on_progress(position, progress)`` hears about every denoising step of every request (its index in
        ``items``); ``received`` (``time.perf_counter()``) is when the worker got the batch, from which
        ``timeout_seconds`` and the progress times count.
        """
        received = time.perf_counter() if received is None else received
        outcomes = list(items)
        keys = {}
        for index, item in enumerate(items):
            if isinstance(item, GenerationRequest):
                try:
                    keys[index] = self._batch_key(item)
                except Exception as error:  # a prompt the syntax library cannot read costs its request only
                    logger.info("request %d: the prompt could not be read: %s", index, error)
                    outcomes[index] = rejection_for(error)
        positions = list(keys)
        requests = [items[index] for index in positions]
        for group in plan_groups(requests, self.max_batch_pixels, [keys[index] for index in positions]):
            batch = [(positions[i], requests[i]) for i in group]
            for (position, _), outcome in zip(batch, self._run_group(batch, on_progress, received)):
                outcomes[position] = outcome
        return outcomes

    def _batch_key(self, request: GenerationRequest) -> tuple:
        """The request's batch key; with a prompt encoder also its chunk count (padding would change images)."""
        if self.prompt_encoder is None:
            return request.batch_key()
        return request.batch_key() + (self.prompt_encoder.length_key(request.model_prompt,
                                                                      request.model_negative_prompt),)

    def _prompt_arguments(self, per_image: list[tuple[GenerationRequest, int]]) -> dict:
        """What the pipeline reads the prompts from: the texts, or the prompt encoder's embeddings."""
        prompts = [request.model_prompt for request, _ in per_image]
        negatives = [request.model_negative_prompt for request, _ in per_image]
        if self.prompt_encoder is not None:
            return self.prompt_encoder.arguments(prompts, negatives)
        return {"prompt": prompts} if negatives[0] is None else {"prompt": prompts, "negative_prompt": negatives}

    def _run_group(self, batch: list[tuple[int, GenerationRequest]], on_progress, received: float) -> list:
        group = [request for _, request in batch]
        first = group[0]
        shape = (first.width, first.height, sum(request.num_images for request in group))
        if self.call_shapes is not None and shape not in self.call_shapes:
            if len(group) > 1:
                return self._each_alone(batch, on_progress, received)
            shown = ", ".join(f"{w}x{h} with {n} image(s)" for w, h, n in sorted(self.call_shapes))
            return [Rejection(INVALID_FIELD, f"this model serves only the shapes it recorded CUDA graphs for: "
                              f"{shown}; got {shape[0]}x{shape[1]} with {shape[2]} image(s)", field="width")]
        started = time.perf_counter()
        failure, run_alone = None, False
        try:
            images, nsfw = self._call_pipeline(group, self._watcher(batch, on_progress, received))
        except DeadlineExceeded as stopped:
            logger.info("a generation of %d request(s) ran past timeout_seconds=%g and was %s", len(group),
                        first.timeout_seconds, stopped)
            return [Rejection(TIMEOUT, f"the generation ran past timeout_seconds ({first.timeout_seconds:g} s, "
                              f"counted from when the worker received it) and was {stopped}; allow more time, or "
                              "ask for fewer steps or a smaller image", field="timeout_seconds")] * len(group)
        except Exception as error:
            run_alone = not _is_out_of_memory(error) and len(group) > 1
            if run_alone:
                logger.exception("a group of %d requests failed; running them one by one", len(group))
            else:
                failure = self._failure(error, group)
        # Recovery runs here, after the except block: until then the error's traceback keeps the failed call's
        # frames, and with them its activations, alive.
        if run_alone:  # one request's input may have broken the shared call: run each alone so only it fails
            return self._each_alone(batch, on_progress, received)
        if failure is not None:
            if failure.reason == OUT_OF_MEMORY:
                self._free_memory()
            return [failure] * len(group)
        elapsed = time.perf_counter() - started
        if self.on_call is not None:
            pixel_steps = len(images) * first.width * first.height * first.num_inference_steps
            self.on_call(len(images), pixel_steps, elapsed)
        elapsed_ms = round(elapsed * 1000, 1)
        results, offset = [], 0
        for request in group:
            count = request.num_images
            results.append(GenerationResult(request, images[offset:offset + count],
                                            {"pipeline": elapsed_ms, "batch_images": len(images)},
                                            nsfw[offset:offset + count] if nsfw is not None else None,
                                            request.scheduler or self._default_scheduler, self.model_name,
                                            self._lora_hashes(request)))
            offset += count
        return results

    def _lora_hashes(self, request: GenerationRequest) -> dict[str, str]:
        if not request.loras or self.loras is None:
            return {}
        return {name: self.loras.short_hash(name) for name, _ in request.loras}

    def _each_alone(self, batch: list[tuple[int, GenerationRequest]], on_progress, received: float) -> list:
        return [outcome for member in batch for outcome in self._run_group([member], on_progress, received)]

    def _failure(self, error: Exception, group: list[GenerationRequest]) -> Rejection:
        """What a failed pipeline call gives its requests: out of memory, or an internal error."""
        first = group[0]
        if _is_out_of_memory(error):
            logger.error("out of memory generating %d image(s) at %dx%d: %s",
                         sum(r.num_images for r in group), first.width, first.height, str(error))
            return Rejection(OUT_OF_MEMORY, "the server ran out of memory for this generation; try fewer or "
                             "smaller images")
        if isinstance(error, NonFiniteImages):
            logger.error("generation of %d request(s) at %dx%d failed: %s", len(group), first.width, first.height,
                         error)
            return Rejection(INTERNAL_ERROR, "the generation came out NaN or infinite (the model's numbers "
                             "overflowed), so no image is sent; lower the prompt's weights or guidance_scale, or try "
                             "another scheduler or seed")
        logger.error("generation failed for %d request(s)", len(group), exc_info=error)
        return Rejection(INTERNAL_ERROR, "generation failed; the server log has the details")

    def _watcher(self, batch: list[tuple[int, GenerationRequest]], on_progress, received: float) -> StepWatcher:
        """The step callback of one call: progress for its requests, and their shared deadline."""
        first = batch[0][1]
        members, offset = [], 0
        for position, request in batch:
            members.append(Watched(position, offset, request.preview_every))
            offset += request.num_images
        if any(member.preview_every for member in members) and self._previewer is None:
            self._previewer = LatentPreviewer(self.pipeline)
        deadline = received + first.timeout_seconds if first.timeout_seconds is not None else None
        return StepWatcher(members, received, deadline, (first.width, first.height), on_progress, self._previewer)

    def _call_pipeline(self, group: list[GenerationRequest],
                       watcher: Optional[StepWatcher] = None) -> tuple[np.ndarray, Optional[list[bool]]]:
        """Run one pipeline call; returns uint8 images and, where the pipeline has a safety checker, its flags."""
        if watcher is not None and watcher.deadline is not None and time.perf_counter() > watcher.deadline:
            raise DeadlineExceeded("not started")
        first = group[0]
        if self.loras is not None:
            self.loras.activate(first.loras)  # the LoRA modules are shared by every task pipeline
        task_pipeline = self._task_pipeline_of(first)
        pipeline = task_pipeline.pipeline_class(**{**task_pipeline.arguments,
                                                   "scheduler": self._schedulers.create(first.scheduler)})
        pipeline.set_progress_bar_config(disable=True)
        per_image = [(request, seed) for request in group for seed in request.seeds]
        arguments = {
            **self._prompt_arguments(per_image),
            "num_inference_steps": first.num_inference_steps,
            "guidance_scale": first.guidance_scale,
            "generator": [torch.Generator("cpu").manual_seed(seed) for _, seed in per_image],
            "output_type": "np",
        }
        if first.image is not None:
            arguments["image"] = [request.image for request, _ in per_image]
            arguments["strength"] = first.strength
        if first.mask_image is not None:
            arguments["mask_image"] = [request.mask_image for request, _ in per_image]
        if task_pipeline.takes_size:
            arguments["height"], arguments["width"] = first.height, first.width
        if self.ip_adapters is not None:
            guidance = first.guidance_scale > 1 and self.pipeline.unet.config.time_cond_proj_dim is None
            arguments.update(self.ip_adapters.arguments(pipeline, [request.ip_adapter for request, _ in per_image],
                                                        guidance))
        if first.control is not None:
            arguments.update(control_arguments(task_pipeline.pipeline_class,
                                               [request.control for request, _ in per_image]))
        if watcher is not None:
            arguments["callback_on_step_end"] = watcher
        with _vae_dtype_kept(pipeline):
            output = pipeline(**arguments)
        nsfw = getattr(output, "nsfw_content_detected", None)
        finite = np.isfinite(output.images).reshape(len(per_image), -1).all(axis=1)
        if not finite.all():  # a NaN would become a black image sent as a success
            raise NonFiniteImages(f"{int((~finite).sum())} of {len(per_image)} image(s) came out NaN or infinite")
        images = (np.clip(_keep_unmasked(output.images, per_image), 0.0, 1.0) * 255).round().astype(np.uint8)
        return images, ([bool(flag) for flag in nsfw] if nsfw is not None else None)

    def _task_pipeline_of(self, request: GenerationRequest) -> "TaskPipeline":
        """The task's pipeline, or its ControlNet pipeline with the request's ControlNets."""
        if request.control is None:
            return self._task_pipelines[request.task]
        key = (request.task, request.control.names)
        if key not in self._controlnet_pipelines:
            models = [self._controlnets[name] for name in request.control.names]
            self._controlnet_pipelines[key] = _task_pipeline(
                controlnet_pipeline(self.pipeline, request.task, models), self._safety_checker)
        return self._controlnet_pipelines[key]

    def _free_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _keep_unmasked(images: np.ndarray, per_image: list[tuple[GenerationRequest, int]]) -> np.ndarray:
    """Inpainting and outpainting images with the sent pixels put back where the mask is not white, as
    AUTOMATIC1111's overlay does: the pipeline re-encodes the whole canvas through the VAE, which changes the
    pixels it was told to keep. A grey mask value blends the two; black keeps the input exactly."""
    for index, (request, _) in enumerate(per_image):
        if request.mask_image is not None:
            repaint = np.asarray(request.mask_image.convert("L"), dtype=np.float32)[..., None] / 255
            sent = np.asarray(request.image.convert("RGB"), dtype=np.float32) / 255
            images[index] = sent * (1 - repaint) + images[index] * repaint
    return images


class NonFiniteImages(ArithmeticError):
    """A pipeline call whose output holds NaN or infinity: an error, never a black image sent as a success."""


# How allocation failures read when they are not a torch.OutOfMemoryError: the CPU allocator's, and cuDNN's and
# cuBLAS's when they cannot get their workspace on a full GPU.
OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED",
                          "CUDA error: out of memory")


def _is_out_of_memory(error: Exception) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator, cuDNN and cuBLAS raise RuntimeErrors that say so."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY_MESSAGES)


@contextmanager
def _vae_dtype_kept(pipeline):
    """Put the VAE back in its dtype however the call ends.

    SDXL in float16 upcasts its VAE to float32 for the decode and casts it back only when the decode
    returns; an out-of-memory error in between would leave it float32 and fail every later call.
    """
    vae = getattr(pipeline, "vae", None)
    dtype = vae.dtype if vae is not None else None
    try:
        yield
    finally:
        if vae is not None and vae.dtype != dtype:
            vae.to(dtype=dtype)


@dataclass(frozen=True)
class TaskPipeline:
    """How to rebuild a task's pipeline around the shared weights, worked out once at start-up."""

    pipeline_class: type
    arguments: dict
    takes_size: bool  # SD/SDXL image-to-image take their size from the input image, not height/width


def _task_pipeline(pipeline, safety_checker: bool) -> TaskPipeline:
    """The class and constructor arguments that rebuild ``pipeline`` around the same weights.

    Building a pipeline object costs about a millisecond and copies no weights; it gives every call its
    own scheduler and per-call state, which the shared pipeline must not keep.
    """
    arguments = dict(pipeline.components)
    for name in inspect.signature(type(pipeline).__init__).parameters:
        if name != "self" and name not in arguments and name in pipeline.config:
            arguments[name] = pipeline.config[name]
    if not safety_checker and "safety_checker" in arguments:
        arguments.update(safety_checker=None, requires_safety_checker=False)
    takes_size = "height" in inspect.signature(type(pipeline).__call__).parameters
    return TaskPipeline(type(pipeline), arguments, takes_size)
