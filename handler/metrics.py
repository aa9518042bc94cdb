"""Custom Prometheus metrics of the service, recorded through TorchServe's metrics cache.

TorchServe publishes them on /metrics (``metrics_mode=prometheus``; ``model_metrics_auto_detect=true`` in
config.properties lets undeclared model metrics through). Times are recorded in seconds because TorchServe's
histogram buckets are fixed at 0.005 .. 10. Queue time is TorchServe's own ``ts_queue_latency_microseconds``.
"""

from ts.metrics.metric_type_enum import MetricTypes

MODEL = "ModelName"
REASON = "Reason"


class ServiceMetrics:
    """Declares the metrics once per worker and records them per request or per pipeline call."""

    def __init__(self, cache, model_name: str):
        self.model_name = model_name
        self.images = cache.add_metric_to_cache("GeneratedImages", "Count", [MODEL], MetricTypes.COUNTER)
        self.pixel_steps = cache.add_metric_to_cache("GeneratedPixelSteps", "Count", [MODEL], MetricTypes.COUNTER)
        self.pipeline_seconds = cache.add_metric_to_cache("PipelineSeconds", "Seconds", [MODEL],
                                                          MetricTypes.HISTOGRAM)
        self.encode_seconds = cache.add_metric_to_cache("EncodeSeconds", "Seconds", [MODEL], MetricTypes.HISTOGRAM)
        self.rejected = cache.add_metric_to_cache("RejectedRequests", "Count", [MODEL, REASON], MetricTypes.COUNTER)
        self.flagged = cache.add_metric_to_cache("NSFWFlaggedImages", "Count", [MODEL], MetricTypes.COUNTER)
        self.first_progress_seconds = cache.add_metric_to_cache("TimeToFirstProgressSeconds", "Seconds", [MODEL],
                                                                MetricTypes.HISTOGRAM)
        self.deadline_stops = cache.add_metric_to_cache("DeadlineStoppedRequests", "Count", [MODEL],
                                                        MetricTypes.COUNTER)

    def generated(self, images: int, pixel_steps: int) -> None:
        self.images.add_or_update(images, [self.model_name])
        self.pixel_steps.add_or_update(pixel_steps, [self.model_name])

    def pipeline_call(self, seconds: float) -> None:
        self.pipeline_seconds.add_or_update(seconds, [self.model_name])

    def encoded(self, seconds: float) -> None:
        self.encode_seconds.add_or_update(seconds, [self.model_name])

    def rejected_request(self, reason: str) -> None:
        self.rejected.add_or_update(1, [self.model_name, reason])

    def flagged_images(self, count: int) -> None:
        self.flagged.add_or_update(count, [self.model_name])

    def first_progress(self, seconds: float) -> None:
        """Seconds from the worker receiving a streaming request to its first progress line."""
        self.first_progress_seconds.add_or_update(seconds, [self.model_name])

    def deadline_stopped(self) -> None:
        self.deadline_stops.add_or_update(1, [self.model_name])
