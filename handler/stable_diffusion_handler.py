"""TorchServe entry point: adapts TorchServe's context, rows and headers to the service.

Everything that decides something lives elsewhere: the generation core in ``handler/core`` (no TorchServe, no
HTTP), the APIs in ``handler/protocols`` (which one answers a request, how it reads and answers), the assembly
in ``handler/service.py``. This class only drives them through TorchServe: route every request, run the
generations of the whole batch together, answer each request in its protocol, record the metrics once.
"""

import json
import logging
import os
import time
from http import HTTPStatus
from pathlib import Path

import torch
from ts.torch_handler.base_handler import BaseHandler

from handler.core.failures import TIMEOUT, Rejection
from handler.core.settings import HandlerSettings
from handler.metrics import ServiceMetrics
from handler.model.device import WorkerRegistry, available_cores, threads_per_worker
from handler.model.memory_budget import MemoryReservations
from handler.protocols.http import HttpRequest, Reply, ServedModel
from handler.repeated_fields import record_repeated_fields
from handler.service import build_service
from handler.streaming import StreamSender

logger = logging.getLogger(__name__)


class StableDiffusionHandler(BaseHandler):
    """Serves a diffusers text-to-image pipeline (plus image-to-image and inpainting on the same weights)."""

    def __init__(self):
        super().__init__()
        self.settings = self.service = self.registry = self.metrics = None
        self.fixed_threads = False

    def initialize(self, context):
        started = time.perf_counter()
        # Bodies reach preprocess as the client's bytes: the protocols parse JSON themselves (refusing duplicate
        # keys) and read multipart files. TorchServe's worker reads this variable for every request.
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"
        record_repeated_fields()
        model_dir = Path(context.system_properties["model_dir"])
        self.settings = HandlerSettings.from_mapping((context.model_yaml_config or {}).get("handler"))
        self.registry = WorkerRegistry.for_model(model_dir)
        self.registry.register(os.getpid())
        self.metrics = ServiceMetrics(context.metrics, context.model_name)
        self.service = build_service(model_dir, self.settings, ServedModel.of_archive(context.model_name,
                                                                                      context.manifest),
                                     context.system_properties.get("gpu_id"), on_call=self._record_call,
                                     reservations=MemoryReservations(self.registry.folder))
        # A compiled graph guards on the thread count, and on CUDA the count barely matters: fix it once.
        self.fixed_threads = self.settings.torch_compile or self.service.placement.device.startswith("cuda")
        self._set_thread_count(force=True)
        self.service.warm_up()
        self.initialized = True
        logger.info("worker %d ready in %.2f s (%d torch threads)", os.getpid(), time.perf_counter() - started,
                    torch.get_num_threads())

    @property
    def engine(self):
        return self.service.engine

    def handle(self, data, context):
        """BaseHandler's flow, with explanations answered per request instead of turning the whole batch."""
        started = time.time()
        self.context = context
        output = [self.describe_handle()] if self._is_describe() else self.postprocess(
            self.inference(self.preprocess(data)))
        context.metrics.add_time("HandlerTime", round((time.time() - started) * 1000, 2), None, "ms")
        return output

    def describe_handle(self):
        """``GET /models/{name}?customized=true``: the service's description of itself."""
        return json.dumps(self.service.describe())

    def preprocess(self, data):
        """Each row -> (its protocol, the Call it read)."""
        self._set_thread_count()
        routed = []
        for index, row in enumerate(data):
            request = HttpRequest(row, self.context.get_all_request_header(index) or {})
            protocol = self.service.router.protocol_for(request)
            routed.append((protocol, protocol.read_call(request)))
        return routed

    def inference(self, data, *args, **kwargs):
        """Generate for every call of the batch in one engine call; -> (protocol, call, its outcomes)."""
        started = time.perf_counter()
        calls = [call for _, call in data]
        requests, owners = [], []  # owners[k]: the index in the batch of the call requests[k] is of
        for index, call in enumerate(calls):
            own = call.requests()
            requests.extend(own)
            owners.extend([index] * len(own))
        logger.info("worker %d generating for %d request(s)", os.getpid(), len(requests))
        sender = StreamSender(self.context, self.metrics, calls, owners) if any(c.streams for c in calls) else None
        outcomes = self.service.generate(requests, on_progress=sender, received=started)
        images = sum(len(outcome.images) for outcome in outcomes if not isinstance(outcome, Rejection))
        logger.info("worker %d generated %d image(s) for %d request(s) in %.2f s", os.getpid(), images, len(calls),
                    time.perf_counter() - started)
        return [(protocol, call, [outcome for owner, outcome in zip(owners, outcomes) if owner == index])
                for index, (protocol, call) in enumerate(data)]

    def postprocess(self, data):
        return [self._answer(index, *item) for index, item in enumerate(data)]

    def _answer(self, index: int, protocol, call, outcomes: list) -> bytes:
        """One call's reply through TorchServe (status, content type, headers, body), and its metrics."""
        started = time.perf_counter()
        reply: Reply = protocol.respond(call, outcomes)
        if reply.failure is not None:
            self.metrics.rejected_request(reply.failure.reason)
            if reply.failure.reason == TIMEOUT:
                self.metrics.deadline_stopped()
        elif outcomes:
            flagged = sum(sum(outcome.nsfw) for outcome in outcomes if outcome.nsfw)
            if flagged:
                self.metrics.flagged_images(flagged)
            self.metrics.encoded(time.perf_counter() - started)
        if reply.status != 200:
            self.context.set_response_status(reply.status, HTTPStatus(reply.status).phrase, index)
        self.context.set_response_content_type(index, reply.content_type)
        for name, value in reply.headers.items():
            self.context.set_response_header(index, name, value)
        return reply.body

    def _record_call(self, images: int, pixel_steps: int, seconds: float) -> None:
        self.metrics.generated(images, pixel_steps)
        self.metrics.pipeline_call(seconds)

    def _set_thread_count(self, force: bool = False):
        """Give this worker an even share of the cores, re-counted as workers are scaled up or down (unless
        the count is fixed at load: compiled graphs recompile when it changes)."""
        if self.fixed_threads and not force:
            return
        threads = threads_per_worker(available_cores(), self.registry.live_count(), self.settings.torch_threads)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
