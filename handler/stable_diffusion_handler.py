"""TorchServe entry point: adapts TorchServe's context and request rows to the generation core.

Everything that decides something (settings, parsing, grouping, encoding) lives in modules that do not
import TorchServe; this class only reads the context, calls them, and sets per-request statuses and headers.
"""

import logging
import os
import time
from http import HTTPStatus
from pathlib import Path

import torch
from ts.torch_handler.base_handler import BaseHandler

from handler.capabilities import capabilities_of
from handler.device import WorkerRegistry, available_cores, choose_placement, threads_per_worker
from handler.encoding import encode_images
from handler.errors import RequestError
from handler.generation import GenerationEngine, GenerationResult
from handler.loading import load_pipeline
from handler.metrics import ServiceMetrics
from handler.pipeline_files import locate_pipeline
from handler.pipeline_index import pipeline_class_name
from handler.request import RequestParser
from handler.settings import HandlerSettings

logger = logging.getLogger(__name__)

class StableDiffusionHandler(BaseHandler):
    """Serves a diffusers text-to-image pipeline (plus image-to-image and inpainting on the same weights)."""

    def __init__(self):
        super().__init__()
        self.settings = None
        self.parser = None
        self.engine = None
        self.registry = None
        self.metrics = None

    def initialize(self, context):
        started = time.perf_counter()
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        model_config = context.model_yaml_config or {}
        self.settings = HandlerSettings.from_mapping(model_config.get("handler"))
        self.registry = WorkerRegistry.for_model(model_dir)
        self.registry.register(os.getpid())
        self._set_thread_count()
        folder = locate_pipeline(model_dir)
        placement = choose_placement(self.settings, torch.cuda.is_available(), properties.get("gpu_id"),
                                     pipeline_class_name(folder))
        pipeline = load_pipeline(folder, placement, self.settings)
        self.metrics = ServiceMetrics(context.metrics, context.model_name)
        self.engine = GenerationEngine(pipeline, self.settings.max_batch_pixels, on_call=self._record_call,
                                       safety_checker=self.settings.safety_checker)
        self.parser = RequestParser(self.settings, capabilities_of(pipeline, self.engine.tasks))
        if self.settings.warmup:
            self.engine.warm_up(self.settings.default_width, self.settings.default_height)
        self.initialized = True
        logger.info("worker %d ready in %.2f s (%d torch threads)", os.getpid(), time.perf_counter() - started,
                    torch.get_num_threads())

    def preprocess(self, data):
        self._set_thread_count()
        return [self._parse(index, row) for index, row in enumerate(data)]

    def inference(self, data, *args, **kwargs):
        started = time.perf_counter()
        with torch.inference_mode():
            outcomes = self.engine.generate(data)
        images = sum(len(outcome.images) for outcome in outcomes if isinstance(outcome, GenerationResult))
        logger.info("worker %d generated %d image(s) for %d request(s) in %.2f s", os.getpid(), images, len(data),
                    time.perf_counter() - started)
        return outcomes

    def postprocess(self, data):
        bodies = []
        for index, outcome in enumerate(data):
            if isinstance(outcome, GenerationResult):
                request = outcome.request
                started = time.perf_counter()
                response = encode_images(outcome.images, request.output_format, list(request.seeds),
                                         request.parameters(), outcome.timings_ms, outcome.nsfw)
                self.metrics.encoded(time.perf_counter() - started)
                if outcome.nsfw:
                    self.metrics.flagged_images(sum(outcome.nsfw))
                self.context.set_response_content_type(index, response.content_type)
                for name, value in response.headers.items():
                    self.context.set_response_header(index, name, value)
                bodies.append(response.body)
            else:
                self.metrics.rejected_request(outcome.reason)
                self.context.set_response_status(outcome.status, HTTPStatus(outcome.status).phrase, index)
                self.context.set_response_content_type(index, "application/json")
                bodies.append(outcome.to_json())
        return bodies

    def _record_call(self, images: int, pixel_steps: int, seconds: float) -> None:
        self.metrics.generated(images, pixel_steps)
        self.metrics.pipeline_call(seconds)

    def _parse(self, index, row):
        try:
            return self.parser.parse(row, self.context.get_all_request_header(index) or {})
        except RequestError as error:
            logger.info("rejected request %d: %s", index, error.message)
            return error
        except Exception:  # a parser bug must cost one request, not the whole batch
            logger.exception("could not parse request %d", index)
            return RequestError(500, "the server could not read this request; the server log has the details",
                                reason="internal_error")

    def _set_thread_count(self):
        """Give this worker an even share of the cores, re-counted as workers are scaled up or down."""
        threads = threads_per_worker(available_cores(), self.registry.live_count(), self.settings.torch_threads)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
