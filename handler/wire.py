"""The HTTP side of TorchServe's native route (``/predictions/{model}``): bodies, headers and statuses.

The core takes a mapping of fields and returns images or a ``Rejection``; this module is where a body becomes
fields (text, JSON or a form), where ``Accept`` picks a format, and where a failure kind becomes a status.
The handler runs with TorchServe's input decoding off (``TS_DECODE_INPUT_REQUEST=false``), so every body
arrives as the client's bytes: JSON is parsed here, once, refusing duplicate keys.
"""

import base64
import json
from typing import Any, Mapping, Optional

from handler.core.contract import ClientRequest, Contract
from handler.core.encoding import OUTPUT_FORMATS
from handler.core.failures import (
    IMAGE_TOO_LARGE, INTERNAL_ERROR, INVALID_BODY, INVALID_FIELD, INVALID_IMAGE, INVALID_JSON, MISSING_PROMPT,
    NOT_ACCEPTABLE, NOT_IMPLEMENTED, OUT_OF_MEMORY, TIMEOUT, UNKNOWN_FIELD, UNSUPPORTED_MEDIA_TYPE, UNSUPPORTED_TASK,
    MAX_SHOWN, Rejection, shown,
)

STATUS_OF_REASON = {
    INVALID_FIELD: 400, UNKNOWN_FIELD: 400, MISSING_PROMPT: 400, INVALID_BODY: 400, INVALID_JSON: 400,
    INVALID_IMAGE: 400, UNSUPPORTED_TASK: 400, IMAGE_TOO_LARGE: 413, UNSUPPORTED_MEDIA_TYPE: 415,
    NOT_ACCEPTABLE: 406, NOT_IMPLEMENTED: 501, OUT_OF_MEMORY: 507, TIMEOUT: 504, INTERNAL_ERROR: 500,
}
STREAM_CONTENT_TYPE = "application/x-ndjson"
CONTENT_TYPE_OF_FORMAT = {
    "array": "application/json", "json": "application/json", "png": "image/png", "jpeg": "image/jpeg",
    "webp": "image/webp", "npy": "application/x-npy",
}
TEXT, JSON, FORM = "text/plain", "application/json", ("application/x-www-form-urlencoded", "multipart/form-data")
ACCEPTED_CONTENT_TYPES = (TEXT, JSON, *FORM)
# A form value starting with an image file's signature is an uploaded file (curl -F image=@photo.png), kept
# as bytes; any other form value is UTF-8 text.
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF")


def read_request(contract: Contract, row: Mapping[str, Any], headers: Mapping[str, Any]) -> ClientRequest:
    """One native request (TorchServe row + headers) -> a ClientRequest; raises Rejection.

    The body's output_format wins over Accept, which wins over the model's default_output_format. An Accept
    that names application/x-ndjson asks for a stream, as the body's ``"stream": true`` does.
    """
    if header(headers, "explain") == "True":  # TorchServe's /explanations route sets this header
        raise Rejection(NOT_IMPLEMENTED, "explanations are not offered for image generation; POST the request to "
                        "/predictions/{model} instead")
    fields, from_form = read_body(row, header(headers, "content-type"))
    accept = header(headers, "accept")
    preferred = None
    if asks_for_stream(accept):
        fields = {"stream": True, **fields}
    elif "output_format" not in fields:
        preferred = negotiate_format(accept, contract.settings.default_output_format)
    return contract.parse(fields, from_form, preferred)


def asks_for_stream(accept: Optional[str]) -> bool:
    """Whether an Accept header names the NDJSON stream (a wildcard alone does not)."""
    return any(media == STREAM_CONTENT_TYPE and q > 0
               for media, q in (_media_range(part) for part in (accept or "").split(",") if part.strip()))


def status_of(rejection: Rejection) -> int:
    return STATUS_OF_REASON[rejection.reason]


def error_object(rejection: Rejection) -> dict:
    return {"code": status_of(rejection), "reason": rejection.reason, "field": rejection.field,
            "message": rejection.message}


def error_body(rejection: Rejection) -> bytes:
    """The body of every error: ``{"error": {"code", "reason", "field", "message"}}``."""
    return json.dumps({"error": error_object(rejection)}).encode()


def event_line(event: dict) -> bytes:
    """One NDJSON line of a stream."""
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


def progress_event(progress, preview_jpeg: Optional[bytes]) -> dict:
    event = {"event": "progress", "step": progress.step, "total": progress.total,
             "elapsed_ms": progress.elapsed_ms, "eta_ms": progress.eta_ms}
    if preview_jpeg is not None:
        event["preview"] = base64.b64encode(preview_jpeg).decode("ascii")
    return event


def error_event(rejection: Rejection) -> dict:
    return {"event": "error", "error": error_object(rejection)}


def header(headers: Mapping[str, Any], name: str) -> Optional[str]:
    """A request header by case-insensitive name, as text."""
    for key, value in headers.items():
        if key.lower() == name:
            return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)
    return None


def media_type(content_type: Optional[str]) -> str:
    """``text/plain; charset=utf-8`` -> ``text/plain``; no header at all reads as text, as upstream's curl -T."""
    return (content_type or TEXT).split(";", 1)[0].strip().lower() or TEXT


def read_body(row: Mapping[str, Any], content_type: Optional[str]) -> tuple[dict[str, Any], bool]:
    """The request's fields and whether they came from a form (whose values are strings or files' bytes).

    A text body is the prompt, as in TorchServe's upstream example; a text body that is a JSON object is read
    as JSON (clients that post JSON without a content type).
    """
    kind = media_type(content_type)
    if kind in FORM:
        if "prompt" not in row:  # curl -d 'a cat' sends the prompt as a form field *named* "a cat"
            raise Rejection(MISSING_PROMPT, "no prompt found: send the prompt as a text/plain body, a JSON object "
                            "{\"prompt\": ...} with Content-Type: application/json, or a form field prompt=...",
                            field="prompt")
        return {str(key): _form_value(str(key), value) for key, value in row.items()}, True
    if kind != TEXT and kind != JSON and not kind.endswith("+json"):
        raise Rejection(UNSUPPORTED_MEDIA_TYPE, f"Content-Type {shown(kind)} is not read here; send one of "
                        f"{list(ACCEPTED_CONTENT_TYPES)}")
    payload = row.get("body", row.get("data", b""))
    text = _utf8(payload, "the request body")
    if kind == TEXT and not text.lstrip().startswith("{"):
        return {"prompt": text.strip()}, False
    try:
        parsed = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except Rejection:
        raise
    except (ValueError, RecursionError) as error:  # bad syntax, over-long integers, deep nesting
        if kind == TEXT:
            return {"prompt": text.strip()}, False
        raise Rejection(INVALID_JSON, f"the body is not valid JSON: {shown(str(error))}") from None
    if not isinstance(parsed, dict):
        raise Rejection(INVALID_JSON, "the JSON body must be an object like {\"prompt\": ...}, got "
                        f"{type(parsed).__name__}")
    return parsed, False


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A proxy that reads the first of two equal keys would disagree with a parser that keeps the last."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise Rejection(INVALID_BODY, f"the JSON body repeats the key {shown(key)}; give each field once",
                            field=key[:MAX_SHOWN])
        result[key] = value
    return result


def _form_value(key: str, value: Any):
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value)
        return value if value.startswith(IMAGE_SIGNATURES) else _utf8(value, f"form field {shown(key)}")
    return str(value)


def _utf8(payload: Any, what: str) -> str:
    if isinstance(payload, str):
        return payload
    try:
        return bytes(payload).decode("utf-8")
    except UnicodeDecodeError:
        raise Rejection(INVALID_BODY, f"{what} is not valid UTF-8 text") from None


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


def result_headers(seeds: list[int], nsfw: Optional[list[bool]]) -> dict[str, str]:
    """The headers every image response carries: the seeds, and the safety checker's flags where it ran."""
    headers = {"X-Seeds": ",".join(str(seed) for seed in seeds)}
    if nsfw is not None:
        headers["X-NSFW"] = ",".join(str(flag).lower() for flag in nsfw)
    return headers
