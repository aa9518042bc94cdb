"""Send the progress lines of streaming calls through TorchServe while their pipeline call runs.

TorchServe sends each ``send_intermediate_predict_response`` message as one HTTP chunk of that request (also
inside a batch) and ``responseTimeout`` applies per message, so a long streamed generation is never taken for
a dead worker. The last line (result or error) is the handler's ordinary return value.
"""

from ts.handler_utils.utils import send_intermediate_predict_response

from handler.core.progress import Progress
from handler.protocols.http import Call


class StreamSender:
    """``on_progress`` for one batch: each streaming call's protocol writes the line, this sends it."""

    def __init__(self, context, metrics, calls: list[Call], owners: list[int]):
        """``owners[position]``: the index in the batch of the call the engine's request ``position`` is of."""
        self.context = context
        self.metrics = metrics
        self.calls = calls
        self.owners = owners
        self.started = set()

    def __call__(self, position: int, progress: Progress) -> None:
        index = self.owners[position]
        if not self.calls[index].streams:
            return
        line = self.calls[index].progress(progress)
        if index not in self.started:  # the first line carries the headers: say it is a stream
            self.started.add(index)
            self.context.set_response_content_type(index, line.content_type)
            for name, value in line.headers.items():
                self.context.set_response_header(index, name, value)
            self.metrics.first_progress(progress.elapsed_ms / 1000)
        send_intermediate_predict_response({index: line.body}, {index: self.context.request_ids[index]},
                                           "Intermediate Prediction success", 200, self.context)
