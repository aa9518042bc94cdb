"""The HTTP edge every protocol stands on: what a request is, what an answer is, and the rules they all share.

The handler runs with TorchServe's input decoding off (``TS_DECODE_INPUT_REQUEST=false``), so every body
arrives as the client's bytes: JSON is parsed here, once, refusing duplicate keys. A failure kind becomes an
HTTP status here (``STATUS_OF_REASON``), the same for every protocol; each protocol only writes its own error
body around it.
"""

import json
import logging
import time
from datetime import datetime
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from handler.core.contract import Contract
from handler.core.requests import GenerationRequest
from handler.core.failures import (
    IMAGE_TOO_LARGE, INTERNAL_ERROR, INVALID_BODY, INVALID_FIELD, INVALID_IMAGE, INVALID_JSON, MISSING_PROMPT,
    NOT_ACCEPTABLE, NOT_IMPLEMENTED, OUT_OF_MEMORY, TIMEOUT, UNKNOWN_FIELD, UNSUPPORTED_MEDIA_TYPE, UNSUPPORTED_TASK,
    MAX_SHOWN, Rejection, shown,
)
from handler.core.progress import Progress

logger = logging.getLogger(__name__)

STATUS_OF_REASON = {
    INVALID_FIELD: 400, UNKNOWN_FIELD: 400, MISSING_PROMPT: 400, INVALID_BODY: 400, INVALID_JSON: 400,
    INVALID_IMAGE: 400, UNSUPPORTED_TASK: 400, IMAGE_TOO_LARGE: 413, UNSUPPORTED_MEDIA_TYPE: 415,
    NOT_ACCEPTABLE: 406, NOT_IMPLEMENTED: 501, OUT_OF_MEMORY: 507, TIMEOUT: 504, INTERNAL_ERROR: 500,
}
TEXT, JSON_TYPE = "text/plain", "application/json"
FORM = ("application/x-www-form-urlencoded", "multipart/form-data")
ACCEPTED_CONTENT_TYPES = (TEXT, JSON_TYPE, *FORM)
# Form fields the client sent more than once (a JSON list), as handler/repeated_fields.py records them.
REPEATED_HEADER = "repeated form fields"
ROUTE_HEADER = "url_path"  # the rest of the path below /predictions/{model}/{version}; absent on KServe's routes
# A form value starting with an image file's signature is an uploaded file (curl -F image=@photo.png), kept
# as bytes; any other form value is UTF-8 text.
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF")


@dataclass
class RouteRejection(Rejection):
    """A request for a route or model an API does not serve: 404 with a code of its own (counted as
    not_implemented). OpenAI's error object shows the code; A1111's answers the 404 alone."""

    status: int = 404
    code: str = "unknown_url"


def status_of(rejection: Rejection) -> int:
    if isinstance(rejection, RouteRejection):
        return rejection.status
    return STATUS_OF_REASON[rejection.reason]


class HttpRequest:
    """One request as TorchServe hands it over: its row (the body, or a form's fields) and its headers.

    ``fields()`` reads the body once, however many times routing and a protocol ask for it.
    """

    def __init__(self, row: Mapping[str, Any], headers: Mapping[str, Any]):
        self.row = row
        self.headers = headers
        self._fields = None

    def header(self, name: str) -> Optional[str]:
        """A request header by case-insensitive name, as text."""
        return header(self.headers, name)

    def fields(self) -> tuple[dict[str, Any], bool]:
        """The body's fields and whether they came from a form; raises Rejection (the same one each time)."""
        if self._fields is None:
            try:
                self._refuse_repeated_fields()
                self._fields = read_body(self.row, self.header("content-type"))
            except Rejection as rejection:
                self._fields = rejection
        if isinstance(self._fields, Rejection):
            raise self._fields
        return self._fields

    def _refuse_repeated_fields(self) -> None:
        """A field sent twice: which one the client meant is unknown (a proxy may read the first, TorchServe keeps
        the last), so neither is used."""
        repeated = self.headers.get(REPEATED_HEADER)
        if repeated:
            name = json.loads(repeated)[0]
            raise Rejection(INVALID_BODY, f"the form sends the field {shown(name)} more than once; send each field "
                            "once (one image per request)", field=name[:MAX_SHOWN])

    @property
    def route(self) -> Optional[str]:
        """The path below the model's URL without its slashes (``v1/images/generations``); None on KServe's."""
        path = self.header(ROUTE_HEADER)
        return None if path is None else path.strip().strip("/")

    def is_under(self, prefix: str) -> bool:
        """Whether ``url_path`` is ``prefix`` or a path below it."""
        route = self.route or ""
        return route == prefix or route.startswith(prefix + "/")

    def refuse_explanations(self, instead: str) -> None:
        """TorchServe's /explanations routes set ``explain``: image generation has none to give."""
        if self.header("explain") == "True":
            raise Rejection(NOT_IMPLEMENTED, f"explanations are not offered for image generation; {instead}")


@dataclass(frozen=True)
class ServedModel:
    """What a protocol may tell a client about the served model beside its contract."""

    name: str
    version: Optional[str] = None
    created: int = 0  # when the archive was built, as Unix time

    @classmethod
    def of_archive(cls, name: str, manifest: Optional[dict]) -> "ServedModel":
        """The model as its .mar MANIFEST describes it: its version, and when it was built (``createdOn``,
        dd/mm/YYYY HH:MM:SS; now where the manifest does not say)."""
        manifest = manifest or {}
        try:
            created = int(datetime.strptime(manifest["createdOn"], "%d/%m/%Y %H:%M:%S").timestamp())
        except (TypeError, KeyError, ValueError):
            created = int(time.time())
        return cls(name, (manifest.get("model") or {}).get("modelVersion"), created)


@dataclass(kw_only=True)
class Call:
    """What a protocol read from one request: the generations it asks for and how to answer, or its failure.

    Each protocol subclasses it with what its answer needs; every subclass is constructible from ``failure``
    alone, which is how a request that could not be read at all is answered in its protocol's shape.
    """

    failure: Optional[Rejection] = None

    def requests(self) -> list[GenerationRequest]:
        """What the engine must generate for this call, in order (none: answered without generating)."""
        return []

    @property
    def streams(self) -> bool:
        """Whether this call is answered with progress lines while it generates (``progress``)."""
        return False

    def progress(self, progress: Progress) -> Optional["Reply"]:
        """The progress line to send now, with the headers of the stream's start."""
        return None


@dataclass(frozen=True)
class Reply:
    """One answer: status, body, content type and headers; ``failure``: the rejection it answers (metrics)."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = JSON_TYPE
    failure: Optional[Rejection] = None


class Protocol:
    """One API: ``read`` a request into a Call, ``respond`` to it from the engine's outcomes.

    Every protocol is made the same way, ``Protocol(contract, model)``. Subclasses set ``call_type`` and
    implement ``read`` (raising Rejection for what the client must fix) and
    ``respond`` (outcomes: one GenerationResult or Rejection per request of ``call.requests()``).
    """

    call_type = Call

    def __init__(self, contract: Contract, model: ServedModel):
        self.contract = contract
        self.model = model

    def read(self, request: HttpRequest) -> Call:
        raise NotImplementedError

    def respond(self, call: Call, outcomes: list) -> Reply:
        raise NotImplementedError

    def read_call(self, request: HttpRequest) -> Call:
        """``read``, with every failure (a client's mistake or a bug here) a Call answered in this protocol."""
        try:
            return self.read(request)
        except Rejection as rejection:
            logger.info("rejected request: %s", rejection.message)
            return self.call_type(failure=rejection)
        except Exception:  # a reader's bug must cost one request, not the whole batch
            logger.exception("could not read a request")
            return self.call_type(failure=Rejection(INTERNAL_ERROR, "the server could not read this request; the "
                                                    "server log has the details"))


def failure_of(call: Call, outcomes: list) -> Optional[Rejection]:
    """What fails a call: its own failure, else the first of its generations that failed."""
    if call.failure is not None:
        return call.failure
    return next((outcome for outcome in outcomes if isinstance(outcome, Rejection)), None)


def result_headers(seeds: list[int], nsfw: Optional[list[bool]]) -> dict[str, str]:
    """The headers every image response carries: the seeds, and the safety checker's flags where it ran."""
    headers = {"X-Seeds": ",".join(str(seed) for seed in seeds)}
    if nsfw is not None:
        headers["X-NSFW"] = ",".join(str(flag).lower() for flag in nsfw)
    return headers


def header(headers: Mapping[str, Any], name: str) -> Optional[str]:
    """A header by case-insensitive name, as text."""
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
    if kind != TEXT and kind != JSON_TYPE and not kind.endswith("+json"):
        raise Rejection(UNSUPPORTED_MEDIA_TYPE, f"Content-Type {shown(kind)} is not read here; send one of "
                        f"{list(ACCEPTED_CONTENT_TYPES)}")
    text = utf8(row.get("body", row.get("data", b"")), "the request body")
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
        if value.startswith(IMAGE_SIGNATURES):
            return value
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:  # a file upload of another kind (a GIF as the image)
            raise Rejection(INVALID_BODY, f"form field {shown(key)} is neither a PNG, JPEG or WebP file (the image "
                            "formats read here) nor UTF-8 text", key[:MAX_SHOWN]) from None
    return str(value)


def utf8(payload: Any, what: str, field: Optional[str] = None) -> str:
    """Bytes as UTF-8 text, or a 400 saying which part of the request is not."""
    if isinstance(payload, str):
        return payload
    try:
        return bytes(payload).decode("utf-8")
    except UnicodeDecodeError:
        raise Rejection(INVALID_BODY, f"{what} is not valid UTF-8 text", field) from None
