"""The native API, ``POST /predictions/{model}``: the contract's fields as JSON, a form or a text prompt.

Its answers: the images in the requested ``output_format`` (chosen by the body, else the ``Accept`` header, else
the model's ``default_output_format``), or with ``"stream": true`` (or ``Accept: application/x-ndjson``) NDJSON
progress lines and then one result line. Errors are ``{"error": {"code", "reason", "field", "message"}}``.
"""

import base64
import json
from dataclasses import dataclass
from typing import Optional

from handler.core.contract import ClientRequest, GenerationRequest
from handler.core.encoding import OUTPUT_FORMATS, encode_images, result_document
from handler.core.failures import NOT_ACCEPTABLE, Rejection, shown
from handler.core.previews import preview_jpeg
from handler.core.progress import Progress
from handler.protocols.http import Call, HttpRequest, Protocol, Reply, failure_of, result_headers, status_of

STREAM_CONTENT_TYPE = "application/x-ndjson"
CONTENT_TYPE_OF_FORMAT = {
    "array": "application/json", "json": "application/json", "png": "image/png", "jpeg": "image/jpeg",
    "webp": "image/webp", "npy": "application/x-npy",
}


@dataclass(kw_only=True)
class NativeCall(Call):
    """One native request: what to generate, in which format, streamed or not."""

    request: Optional[ClientRequest] = None

    def requests(self) -> list[GenerationRequest]:
        return [self.request.generation] if self.request is not None else []

    @property
    def streams(self) -> bool:
        return self.request is not None and self.request.stream

    def progress(self, progress: Progress) -> Optional[Reply]:
        preview = preview_jpeg(progress.preview) if progress.preview is not None else None
        return Reply(200, event_line(progress_event(progress, preview)),
                     result_headers(list(self.request.generation.seeds), None), STREAM_CONTENT_TYPE)


class NativeProtocol(Protocol):
    """The native API of one loaded model."""

    call_type = NativeCall

    def read(self, request: HttpRequest) -> NativeCall:
        """The body's output_format wins over Accept, which wins over the model's default_output_format. An
        Accept that names application/x-ndjson asks for a stream, as the body's ``"stream": true`` does."""
        request.refuse_explanations("POST the request to /predictions/{model} instead")
        fields, from_form = request.fields()
        accept = request.header("accept")
        preferred = None
        if asks_for_stream(accept):
            fields = {"stream": True, **fields}
        elif "output_format" not in fields:
            preferred = negotiate_format(accept, self.contract.settings.default_output_format)
        return NativeCall(request=self.contract.parse(fields, from_form, preferred))

    def respond(self, call: NativeCall, outcomes: list) -> Reply:
        """The images in the call's format; a stream ends with one result or error line sent with status 200,
        since its first lines may be out."""
        stream = call.streams
        failure = failure_of(call, outcomes)
        if failure is not None:
            if stream:
                return Reply(200, event_line(error_event(failure)), content_type=STREAM_CONTENT_TYPE,
                             failure=failure)
            return Reply(status_of(failure), error_body(failure), failure=failure)
        (outcome,) = outcomes
        seeds, output_format = list(outcome.request.seeds), call.request.output_format
        headers = result_headers(seeds, outcome.nsfw)
        if stream:
            document = result_document(outcome.images, output_format, seeds, outcome.parameters(),
                                       outcome.timings_ms, outcome.nsfw)
            return Reply(200, event_line({"event": "result", **document}), headers, STREAM_CONTENT_TYPE)
        body = encode_images(outcome.images, output_format, seeds, outcome.parameters(), outcome.timings_ms,
                             outcome.nsfw)
        return Reply(200, body, headers, CONTENT_TYPE_OF_FORMAT[output_format])


def error_object(rejection: Rejection) -> dict:
    return {"code": status_of(rejection), "reason": rejection.reason, "field": rejection.field,
            "message": rejection.message}


def error_body(rejection: Rejection) -> bytes:
    """The body of every native error: ``{"error": {"code", "reason", "field", "message"}}``."""
    return json.dumps({"error": error_object(rejection)}).encode()


def event_line(event: dict) -> bytes:
    """One NDJSON line of a stream."""
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


def progress_event(progress: Progress, preview_jpeg_bytes: Optional[bytes]) -> dict:
    event = {"event": "progress", "step": progress.step, "total": progress.total,
             "elapsed_ms": progress.elapsed_ms, "eta_ms": progress.eta_ms}
    if preview_jpeg_bytes is not None:
        event["preview"] = base64.b64encode(preview_jpeg_bytes).decode("ascii")
    return event


def error_event(rejection: Rejection) -> dict:
    return {"event": "error", "error": error_object(rejection)}


def asks_for_stream(accept: Optional[str]) -> bool:
    """Whether an Accept header names the NDJSON stream (a wildcard alone does not)."""
    return any(media == STREAM_CONTENT_TYPE and q > 0
               for media, q in (_media_range(part) for part in (accept or "").split(",") if part.strip()))


def negotiate_format(accept: Optional[str], default: str) -> Optional[str]:
    """The output format an Accept header prefers, by q-value; None when it leaves the choice to the server.

    Each format takes the q of the most specific media range that matches its content type (``image/png`` over
    ``image/*`` over ``*/*``); the highest q wins, ties go to the default format, then to OUTPUT_FORMATS order.
    """
    if not accept or not accept.strip():
        return None
    ranges = [_media_range(part) for part in accept.split(",") if part.strip()]
    candidates = [default] + [name for name in OUTPUT_FORMATS if name != default]
    best, best_q = None, 0.0
    for name in candidates:
        q = _quality(CONTENT_TYPE_OF_FORMAT[name], ranges)
        if q > best_q:
            best, best_q = name, q
    if best is None:
        offered = sorted(set(CONTENT_TYPE_OF_FORMAT.values()))
        raise Rejection(NOT_ACCEPTABLE, f"Accept {shown(accept)} allows none of the formats served: {offered}; "
                        "or name one in the field output_format")
    return best


def _media_range(part: str) -> tuple[str, float]:
    media, *parameters = (piece.strip() for piece in part.split(";"))
    q = 1.0
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                q = min(max(float(value), 0.0), 1.0)
            except ValueError:
                q = 0.0
    return media.lower(), q


def _quality(content_type: str, ranges: list[tuple[str, float]]) -> float:
    """The q of the most specific range matching ``content_type`` (0 when none does)."""
    family = content_type.split("/", 1)[0]
    best_specificity, q = -1, 0.0
    for media, range_q in ranges:
        specificity = 2 if media == content_type else 1 if media == f"{family}/*" else 0 if media == "*/*" else -1
        if specificity > best_specificity:
            best_specificity, q = specificity, range_q
    return q if best_specificity >= 0 else 0.0
