"""TorchServe entry point: adapts TorchServe's context, rows and headers to the generation core.

Everything that decides something (the contract, grouping, generation, encoding) lives in ``handler/core``,
which does not import TorchServe. Three doors read bodies and headers and shape answers: ``handler/wire.py``
(the native API), ``handler/openai_api.py`` (the OpenAI Images API, chosen per request by the ``url_path``
header) and ``handler/kserve_api.py`` (KServe v1 and v2, for requests without ``url_path``, by their body).
This class only wires them to TorchServe: per-request statuses, content types and headers, the describe API.
"""

import json
import logging
import os
import time
from dataclasses import replace
from http import HTTPStatus
from pathlib import Path

import torch
from ts.torch_handler.base_handler import BaseHandler

from handler import a1111_api, kserve_api, openai_api, wire
from handler.core.capabilities import capabilities_of
from handler.core.controlnets import controlnet_tasks
from handler.core.contract import ClientRequest, Contract, GenerationRequest
from handler.core.encoding import encode_images, result_document
from handler.core.failures import INTERNAL_ERROR, TIMEOUT, Rejection
from handler.core.generation import GenerationEngine, GenerationResult
from handler.core.prompts import prompt_encoder_for
from handler.core.settings import HandlerSettings
from handler.metrics import ServiceMetrics
from handler.streaming import StreamSender
from handler.model.controlnets import controlnet_folders, load_controlnets
from handler.model.adapters import find_loras, serve_loras
from handler.model.device import (WorkerRegistry, available_cores, choose_placement, select_device,
                                  threads_per_worker)
from handler.model.loading import load_pipeline
from handler.model.optimizations import compiled_graphs, warmup_buckets
from handler.model.pipeline_files import locate_pipeline
from handler.model.pipeline_index import pipeline_class_name
from handler.model.translation import load_translator

logger = logging.getLogger(__name__)
# Calls that bring a list of generations (KServe v1 instances; none for A1111's GET routes) and get a list back.
MULTI_WORK_CALLS = (kserve_api.KServeCall, a1111_api.A1111Call)


class StableDiffusionHandler(BaseHandler):
    """Serves a diffusers text-to-image pipeline (plus image-to-image and inpainting on the same weights)."""

    def __init__(self):
        super().__init__()
        self.settings = None
        self.contract = None
        self.engine = None
        self.registry = None
        self.metrics = None
        self.openai = None
        self.fixed_threads = False
        self.translator = None
        self.kserve = None
        self.a1111 = None

    def initialize(self, context):
        started = time.perf_counter()
        # Bodies reach preprocess as the client's bytes: wire.py parses JSON itself (refusing duplicate keys)
        # and reads multipart files. TorchServe's worker reads this variable for every request.
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        model_config = context.model_yaml_config or {}
        self.settings = HandlerSettings.from_mapping(model_config.get("handler"))
        self.registry = WorkerRegistry.for_model(model_dir)
        self.registry.register(os.getpid())
        folder = locate_pipeline(model_dir)
        placement = choose_placement(self.settings, torch.cuda.is_available(), properties.get("gpu_id"),
                                     pipeline_class_name(folder))
        select_device(placement)
        # A compiled graph guards on the thread count, and on CUDA the count barely matters: fix it once.
        self.fixed_threads = self.settings.torch_compile or placement.device.startswith("cuda")
        self._set_thread_count(force=True)
        settings, lora_files = self.settings, find_loras(model_dir, self.settings.lora_dir)
        prepared = {}  # the LoraAdapters, made as the pipeline loads: hot-swap slots must exist before compiling
        pipeline = load_pipeline(folder, placement, settings, prepare=lambda loaded: prepared.update(loras=serve_loras(
            loaded, lora_files, settings.max_loras, settings.max_loaded_loras, hotswap=settings.torch_compile)))
        loras = prepared["loras"]
        controlnets = load_controlnets(controlnet_folders(model_dir), placement)
        self.metrics = ServiceMetrics(context.metrics, context.model_name)
        buckets = warmup_buckets(settings)
        cuda_graphs = settings.torch_compile and settings.compile_mode == "reduce-overhead"
        self.engine = GenerationEngine(pipeline, settings.max_batch_pixels, on_call=self._record_call,
                                       safety_checker=settings.safety_checker, loras=loras,
                                       prompt_encoder=prompt_encoder_for(pipeline, settings.prompt_syntax),
                                       controlnets=controlnets,
                                       call_shapes=frozenset(buckets) if cuda_graphs else None,
                                       model_name=context.model_name)
        self.translator = load_translator(model_dir, settings.translate, placement.device)
        self.contract = Contract(settings, replace(
            capabilities_of(pipeline, self.engine.tasks), loras=loras.names if loras is not None else (),
            controlnets=tuple(controlnets),
            controlnet_tasks=controlnet_tasks(type(pipeline).__name__, self.engine.tasks) if controlnets else ()))
        self.openai = openai_api.OpenAIDoor(self.contract, context.model_name,
                                            openai_api.archive_created(context.manifest))
        self.a1111 = a1111_api.A1111Door(self.contract, context.model_name)
        self.kserve = kserve_api.KServeDoor(self.contract, context.model_name,
                                            ((context.manifest or {}).get("model") or {}).get("modelVersion"))
        if self.settings.warmup:
            self.engine.warm_up(buckets)
            if self.settings.torch_compile or self.settings.compile_vae:
                logger.info("torch.compile compiled %d graph(s) during warm-up at %s", compiled_graphs(),
                            ", ".join(f"{w}x{h}x{n}" for w, h, n in buckets))
        self.initialized = True
        logger.info("worker %d ready in %.2f s (%d torch threads)", os.getpid(), time.perf_counter() - started,
                    torch.get_num_threads())

    def handle(self, data, context):
        """BaseHandler's flow, with explanations answered per request instead of turning the whole batch."""
        started = time.time()
        self.context = context
        if self._is_describe():
            output = [self.describe_handle()]
        else:
            output = self.postprocess(self.inference(self.preprocess(data)))
        context.metrics.add_time("HandlerTime", round((time.time() - started) * 1000, 2), None, "ms")
        return output

    def describe_handle(self):
        """``GET /models/{name}?customized=true``: the request schema and capabilities of this loaded model, and
        how it reads prompts (``translate`` is ``never`` where no translator is loaded)."""
        settings = self.settings
        return json.dumps({
            "request_schema": self.contract.json_schema(),
            "capabilities": self.contract.capabilities.describe(settings.default_width, settings.default_height),
            "prompts": {"prompt_syntax": settings.prompt_syntax,
                        "translate": settings.translate if self.translator is not None else "never"},
        })

    def preprocess(self, data):
        self._set_thread_count()
        return [self._read(index, row) for index, row in enumerate(data)]

    def inference(self, data, *args, **kwargs):
        """Generate for the whole batch at once; a KServe v1 request brings one generation per instance."""
        started = time.perf_counter()
        work, owner = [], []  # owner[k]: the index in the batch of the request that work[k] belongs to
        for index, item in enumerate(data):
            items = item.work() if isinstance(item, MULTI_WORK_CALLS) else [
                item.generation if isinstance(item, ClientRequest) else
                item.work() if isinstance(item, openai_api.OpenAICall) else item]
            work.extend(items)
            owner.extend([index] * len(items))
        if self.translator is not None:
            work = self.translator.apply(work)
        logger.info("worker %d generating for %d request(s)", os.getpid(),
                    sum(isinstance(item, GenerationRequest) for item in work))
        streams = {index: item.generation.seeds for index, item in enumerate(data)
                   if isinstance(item, ClientRequest) and item.stream}
        sender = StreamSender(self.context, self.metrics, streams) if streams else None
        with torch.inference_mode():
            outcomes = self.engine.generate(
                work, on_progress=(lambda position, progress: sender(owner[position], progress)) if sender else None,
                received=started)
        images = sum(len(outcome.images) for outcome in outcomes if isinstance(outcome, GenerationResult))
        logger.info("worker %d generated %d image(s) for %d request(s) in %.2f s", os.getpid(), images, len(data),
                    time.perf_counter() - started)
        per_request = [[] for _ in data]
        for position, outcome in enumerate(outcomes):
            per_request[owner[position]].append(outcome)
        return [(outcome if isinstance(item, MULTI_WORK_CALLS) else outcome[0], item)
                for outcome, item in zip(per_request, data)]

    def postprocess(self, data):
        return [self._respond(index, outcome, item) for index, (outcome, item) in enumerate(data)]

    def _respond(self, index: int, outcome, item) -> bytes:
        """The body, status, content type and headers of one request.

        A stream ends with one result or error event sent with status 200, since its first lines may be out.
        """
        if isinstance(item, openai_api.OpenAICall):
            return self._respond_openai(index, outcome, item)
        if isinstance(item, kserve_api.KServeCall):
            return self._respond_kserve(index, outcome, item)
        if isinstance(item, a1111_api.A1111Call):
            return self._respond_a1111(index, outcome, item)
        stream = isinstance(item, ClientRequest) and item.stream
        if stream:
            self.context.set_response_content_type(index, wire.STREAM_CONTENT_TYPE)
        if isinstance(outcome, GenerationResult):
            seeds = list(outcome.request.seeds)
            for name, value in wire.result_headers(seeds, outcome.nsfw).items():
                self.context.set_response_header(index, name, value)
            if outcome.nsfw:
                self.metrics.flagged_images(sum(outcome.nsfw))
            started = time.perf_counter()
            if stream:
                document = result_document(outcome.images, item.output_format, seeds, outcome.parameters(),
                                           outcome.timings_ms, outcome.nsfw)
                body = wire.event_line({"event": "result", **document})
            else:
                body = encode_images(outcome.images, item.output_format, seeds, outcome.parameters(),
                                     outcome.timings_ms, outcome.nsfw)
                self.context.set_response_content_type(index, wire.CONTENT_TYPE_OF_FORMAT[item.output_format])
            self.metrics.encoded(time.perf_counter() - started)
            return body
        self._count_rejection(outcome)
        if stream:
            return wire.event_line(wire.error_event(outcome))
        status = wire.status_of(outcome)
        self.context.set_response_status(status, HTTPStatus(status).phrase, index)
        self.context.set_response_content_type(index, "application/json")
        return wire.error_body(outcome)

    def _respond_openai(self, index: int, outcome, call: "openai_api.OpenAICall") -> bytes:
        started = time.perf_counter()
        reply = self.openai.respond(call, outcome)
        if isinstance(outcome, GenerationResult):
            if outcome.nsfw:
                self.metrics.flagged_images(sum(outcome.nsfw))
            self.metrics.encoded(time.perf_counter() - started)
        elif call.failure is not None or isinstance(outcome, Rejection):
            self._count_rejection(call.failure or outcome)
        return self._send(index, reply)

    def _respond_kserve(self, index: int, outcomes: list, call: "kserve_api.KServeCall") -> bytes:
        started = time.perf_counter()
        reply = self.kserve.respond(call, outcomes)
        if reply.status == 200:
            flagged = sum(sum(outcome.nsfw) for outcome in outcomes if outcome.nsfw)
            if flagged:
                self.metrics.flagged_images(flagged)
            self.metrics.encoded(time.perf_counter() - started)
        else:
            self._count_rejection(call.failure or next(o for o in outcomes if isinstance(o, Rejection)))
        return self._send(index, reply)

    def _respond_a1111(self, index: int, outcomes: list, call: "a1111_api.A1111Call") -> bytes:
        started = time.perf_counter()
        reply = self.a1111.respond(call, outcomes)
        if reply.status == 200 and call.request is not None:
            flagged = sum(sum(outcome.nsfw) for outcome in outcomes if outcome.nsfw)
            if flagged:
                self.metrics.flagged_images(flagged)
            self.metrics.encoded(time.perf_counter() - started)
        elif reply.status != 200:
            self._count_rejection(call.failure or next(o for o in outcomes if isinstance(o, Rejection)))
        return self._send(index, reply)

    def _send(self, index: int, reply: "openai_api.Reply") -> bytes:
        """A door's answer through TorchServe: its status, content type, headers and body."""
        if reply.status != 200:
            self.context.set_response_status(reply.status, HTTPStatus(reply.status).phrase, index)
        self.context.set_response_content_type(index, reply.content_type)
        for name, value in reply.headers.items():
            self.context.set_response_header(index, name, value)
        return reply.body

    def _count_rejection(self, rejection: Rejection) -> None:
        self.metrics.rejected_request(rejection.reason)
        if rejection.reason == TIMEOUT:
            self.metrics.deadline_stopped()

    def _record_call(self, images: int, pixel_steps: int, seconds: float) -> None:
        self.metrics.generated(images, pixel_steps)
        self.metrics.pipeline_call(seconds)

    def _read(self, index, row):
        """One request row -> a ClientRequest, an OpenAICall (by its url_path) or a KServeCall (no url_path, a KServe
        body), or the Rejection that answers it."""
        headers = self.context.get_all_request_header(index) or {}
        a1111_route = a1111_api.route_of(headers)
        if a1111_route is not None:
            try:
                return self.a1111.read(a1111_route, row, headers)
            except Exception as error:  # a Rejection, or a parser bug: it costs this request only
                return a1111_api.A1111Call(a1111_route, failure=self._read_failure(index, error))
        route = openai_api.route_of(headers)
        try:
            if route is not None:
                return self.openai.read(route, row, headers)
            return self.kserve.read(row, headers) or wire.read_request(self.contract, row, headers)
        except Exception as error:
            failure = self._read_failure(index, error)
        return failure if route is None else openai_api.OpenAICall(route, failure=failure)

    @staticmethod
    def _read_failure(index: int, error: Exception) -> Rejection:
        """What answers a request that could not be read: its Rejection, or for a parser bug an internal error
        (which must cost one request, not the whole batch)."""
        if isinstance(error, Rejection):
            logger.info("rejected request %d: %s", index, error.message)
            return error
        logger.error("could not read request %d", index, exc_info=error)
        return Rejection(INTERNAL_ERROR, "the server could not read this request; the server log has the details")

    def _set_thread_count(self, force: bool = False):
        """Give this worker an even share of the cores, re-counted as workers are scaled up or down (unless
        the count is fixed at load: compiled graphs recompile when it changes)."""
        if self.fixed_threads and not force:
            return
        threads = threads_per_worker(available_cores(), self.registry.live_count(), self.settings.torch_threads)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
