"""``build_service``: the one assembly of a served model, used by the TorchServe handler, benchmarks and tests.

It finds the pipeline in a model folder (an unpacked ``.mar`` or a plain diffusers folder), loads and places it
as the settings ask, and binds around it the generation engine, the prompt translator, the request contract
and the protocols. What only a TorchServe worker has (its metrics, its share of the cores) stays in the handler.
"""

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from handler.core.capabilities import capabilities_of
from handler.core.contract import Contract
from handler.core.requests import GenerationRequest
from handler.core.controlnets import controlnet_tasks
from handler.core.generation import GenerationEngine
from handler.core.progress import Progress
from handler.core.prompts import prompt_encoder_for
from handler.core.settings import HandlerSettings, SettingsError
from handler.model.adapters import find_loras, serve_loras
from handler.model.controlnets import controlnet_folders, load_controlnets
from handler.model.embeddings import find_embeddings, load_embeddings
from handler.model.ip_adapters import ip_adapter_folders, load_ip_adapters
from handler.model.device import Placement, choose_placement, select_device
from handler.model.loading import optimize_pipeline, read_pipeline
from handler.model.memory_budget import MemoryReservations, weight_bytes
from handler.model.optimizations import compiled_graphs, warmup_buckets
from handler.model.pipeline_files import locate_pipeline
from handler.model.pipeline_index import pipeline_class_name
from handler.model.translation import PromptTranslator, load_translator
from handler.protocols import native
from handler.protocols.http import ServedModel
from handler.protocols.routing import Router

logger = logging.getLogger(__name__)


@dataclass
class Service:
    """A loaded model ready to serve: read requests with ``router``, generate with ``generate``."""

    settings: HandlerSettings
    placement: Placement
    contract: Contract
    engine: GenerationEngine
    translator: Optional[PromptTranslator]
    router: Router

    def generate(self, requests: list[GenerationRequest], on_progress: Optional[Callable[[int, Progress], None]]
                 = None, received: Optional[float] = None) -> list:
        """One GenerationResult or Rejection per request: translated where the settings ask, then generated
        together (``on_progress(position, progress)`` with the request's position in ``requests``)."""
        outcomes = self.translator.apply(requests) if self.translator is not None else list(requests)
        pending = [index for index, outcome in enumerate(outcomes) if isinstance(outcome, GenerationRequest)]
        relay = (lambda position, progress: on_progress(pending[position], progress)) if on_progress else None
        with torch.inference_mode():
            generated = self.engine.generate([outcomes[index] for index in pending], on_progress=relay,
                                             received=received)
        for index, outcome in zip(pending, generated):
            outcomes[index] = outcome
        return outcomes

    def describe(self) -> dict:
        """What TorchServe's describe API (``GET /models/{name}?customized=true``) tells a client: the native
        request schema and capabilities of this loaded model, and how it reads prompts (``translate`` is
        ``never`` where no translator is loaded)."""
        settings = self.settings
        return {
            "request_schema": native.request_schema(self.contract),
            "capabilities": self.contract.capabilities.describe(settings.default_width, settings.default_height),
            "prompts": {"prompt_syntax": settings.prompt_syntax,
                        "translate": settings.translate if self.translator is not None else "never"},
        }

    def warm_up(self) -> None:
        """Pay lazy initialisation (and compilation) before the first client does, where the settings ask."""
        if not self.settings.warmup:
            return
        buckets = warmup_buckets(self.settings, self.placement.device)
        self.engine.warm_up(buckets)
        if self.settings.torch_compile or self.settings.compile_vae:
            logger.info("torch.compile compiled %d graph(s) during warm-up at %s", compiled_graphs(),
                        ", ".join(f"{w}x{h}x{n}" for w, h, n in buckets))


def build_service(model_dir: Path, settings: HandlerSettings = HandlerSettings(),
                  model: ServedModel = ServedModel("stable_diffusion"), gpu_id: Optional[int] = None,
                  on_call: Optional[Callable[[int, int, float], None]] = None,
                  reservations: Optional[MemoryReservations] = None,
                  placement: Optional[Placement] = None) -> Service:
    """Load the model in ``model_dir`` and assemble everything that serves it.

    ``gpu_id``: the GPU TorchServe assigned (CUDA only); ``on_call(images, pixel_steps, seconds)`` hears about
    every pipeline call (the handler's metrics); ``reservations``: the memory ledger this host's workers of the
    model share (``memory_budget_gb``), so a worker that would not fit is refused before it loads;
    ``placement``: a device and dtype chosen by the caller (a benchmark comparing them) instead of the settings.
    """
    started = time.perf_counter()
    model_dir = Path(model_dir)
    folder = locate_pipeline(model_dir)
    placement = placement or choose_placement(settings, torch.cuda.is_available(), gpu_id,
                                              pipeline_class_name(folder))
    select_device(placement)
    if reservations is not None:
        reservations.reserve(os.getpid(), placement.device, weight_bytes(folder, settings, placement.dtype),
                             settings, placement.dtype)
    lora_files = find_loras(model_dir, settings.lora_dir)
    if settings.compile_freezing and lora_files:
        raise SettingsError(f"compile_freezing folds the weights into the compiled code, so LoRAs could never be "
                            f"applied: this model packs {sorted(lora_files)}; turn compile_freezing off")
    pipeline = read_pipeline(folder, placement, settings)
    embeddings = load_embeddings(pipeline, find_embeddings(model_dir, settings.embedding_dir))
    ip_adapters = load_ip_adapters(pipeline, ip_adapter_folders(model_dir))
    # LoRA hot-swap slots must exist before the pipeline is compiled.
    loras = serve_loras(pipeline, lora_files, settings.max_loras,
                        settings.max_loaded_loras, hotswap=settings.torch_compile)
    optimize_pipeline(pipeline, placement, settings)
    if reservations is not None:
        reservations.mark_loaded(os.getpid())
    controlnets = load_controlnets(controlnet_folders(model_dir), placement)
    cuda_graphs = settings.torch_compile and settings.compile_mode == "reduce-overhead"
    call_shapes = frozenset(warmup_buckets(settings, placement.device)) if cuda_graphs else None
    engine = GenerationEngine(pipeline, settings.max_batch_pixels, on_call=on_call,
                              safety_checker=settings.safety_checker, loras=loras,
                              prompt_encoder=prompt_encoder_for(pipeline, settings.prompt_syntax),
                              controlnets=controlnets, ip_adapters=ip_adapters,
                              call_shapes=call_shapes, model_name=model.name)  # the images' metadata names the model
    contract = Contract(settings, replace(
        capabilities_of(pipeline, engine.tasks), loras=loras.names if loras is not None else (),
        controlnets=tuple(controlnets), embeddings=embeddings,
        ip_adapters=ip_adapters.names if ip_adapters is not None else (),
        controlnet_tasks=controlnet_tasks(type(pipeline).__name__, engine.tasks) if controlnets else ()))
    service = Service(settings, placement, contract, engine, load_translator(model_dir, settings.translate,
                                                                              placement.device),
                      Router(contract, model))
    logger.info("assembled %s in %.2f s", type(pipeline).__name__, time.perf_counter() - started)
    return service
