"""Send a streaming request's progress lines through TorchServe while its pipeline call runs.

TorchServe sends each ``send_intermediate_predict_response`` message as one HTTP chunk of that request (also
inside a batch) and ``responseTimeout`` applies per message, so a long streamed generation is never taken for
a dead worker. The last line (result or error) is the handler's ordinary return value.
"""

from ts.handler_utils.utils import send_intermediate_predict_response

from handler import wire
from handler.core.previews import preview_jpeg
from handler.core.progress import Progress


class StreamSender:
    """``on_progress`` for one batch: writes an NDJSON progress line for each streaming request."""

    def __init__(self, context, metrics, streams: dict[int, tuple[int, ...]]):
        """``streams``: the seeds of each streaming request, by its index in the batch."""
        self.context = context
        self.metrics = metrics
        self.streams = streams
        self.started = set()

    def __call__(self, position: int, progress: Progress) -> None:
        if position not in self.streams:
            return
        if position not in self.started:  # the first line carries the headers: say it is a stream
            self.started.add(position)
            self.context.set_response_content_type(position, wire.STREAM_CONTENT_TYPE)
            for name, value in wire.result_headers(list(self.streams[position]), None).items():
                self.context.set_response_header(position, name, value)
            self.metrics.first_progress(progress.elapsed_ms / 1000)
        preview = preview_jpeg(progress.preview) if progress.preview is not None else None
        line = wire.event_line(wire.progress_event(progress, preview))
        send_intermediate_predict_response({position: line}, {position: self.context.request_ids[position]},
                                           "Intermediate Prediction success", 200, self.context)
