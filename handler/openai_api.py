"""The OpenAI Images API door: ``/predictions/{model}/{version}/v1/...``, for the official ``openai`` SDK.

TorchServe sends any request on a path below a model's version to the handler, whatever its HTTP method, with
the rest of the path in the request header ``url_path`` (``v1/images/generations``) and without the method.
A request whose ``url_path`` starts with ``v1`` comes through this door; any other goes to the native one
(``handler/wire.py``).

The door translates an OpenAI body into the contract's fields and lets ``Contract.parse`` judge them: every
range, default and message comes from the contract. The door only maps names (``n`` is ``num_images``,
``size`` is ``width`` and ``height``, an OpenAI ``mask`` becomes a white-=-repaint ``mask_image``) and maps a
failure's field back to the name the client used. It answers OpenAI's ``ImagesResponse``, model list and
error object. Nothing here knows TorchServe: the handler hands it rows and headers and sends what it returns.
"""

import base64
import io
import json
import re
import time
from datetime import datetime
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
from PIL import Image

from handler import wire
from handler.core.contract import ClientRequest, Contract
from handler.core.encoding import SINGLE_IMAGE_FORMATS, image_file
from handler.core.failures import (
    INVALID_FIELD, NOT_IMPLEMENTED, OUT_OF_MEMORY, UNKNOWN_FIELD, Rejection, invalid, shown,
)
from handler.core.images import decode_image

ROUTE_HEADER = "url_path"
PREFIX = "v1"
GENERATIONS, EDITS, MODELS = "v1/images/generations", "v1/images/edits", "v1/models"
IMAGE_ROUTES = (GENERATIONS, EDITS)
IMAGE_FORMATS = SINGLE_IMAGE_FORMATS  # the files b64_json can carry: png, jpeg, webp
DEFAULT_IMAGE_FORMAT = "png"
# The contract format asked for on this door's behalf: it holds any number of images (the door encodes the files).
CONTRACT_FORMAT = "json"
JSON_TYPE = "application/json"
SIZE = re.compile(r"\s*(\d{1,9})\s*[xX]\s*(\d{1,9})\s*")
MAX_UNKNOWN_SHOWN = 5


@dataclass(frozen=True)
class OpenAIField:
    """One OpenAI request field: the endpoints that have it and what this server does with it (docs/openai.md)."""

    name: str
    routes: tuple[str, ...]
    handling: str


BOTH = IMAGE_ROUTES
OPENAI_FIELDS: tuple[OpenAIField, ...] = (
    OpenAIField("prompt", BOTH, "`prompt`"),
    OpenAIField("n", BOTH, "`num_images`"),
    OpenAIField("size", BOTH, "`WIDTHxHEIGHT` -> `width`, `height`; `auto` or left out: the model's defaults "
                              "(edits: the input image's size)"),
    OpenAIField("response_format", BOTH, "`b64_json` (the default); `url` is refused (400): this server does not "
                                         "store files"),
    OpenAIField("output_format", BOTH, "`png` (the default), `jpeg` or `webp`: the file in `b64_json`; `gif` and "
                                       "`svg` are refused (400)"),
    OpenAIField("image", (EDITS,), "`image` (the uploaded file; one image: `image[]` with one file works too)"),
    OpenAIField("mask", (EDITS,), "`mask_image`: transparent pixels (alpha 0) become white (repaint), all others "
                                  "black; switches to inpainting"),
    OpenAIField("background", BOTH, "`auto` and `opaque` accepted (every image is opaque); `transparent` is "
                                    "refused (400)"),
    OpenAIField("stream", BOTH, "`false` accepted; `true` is refused (400): stream on the native route"),
    OpenAIField("markup", (EDITS,), "refused (400): use `mask`"),
    OpenAIField("model", BOTH, "ignored: the URL names the model"),
    OpenAIField("quality", BOTH, "ignored: set `num_inference_steps` in `extra_body`"),
    OpenAIField("style", (GENERATIONS,), "ignored"),
    OpenAIField("moderation", (GENERATIONS,), "ignored: the model's `safety_checker` setting decides"),
    OpenAIField("output_compression", BOTH, "ignored: JPEG and WebP are written at quality 90"),
    OpenAIField("user", BOTH, "ignored (not logged)"),
    OpenAIField("safety_identifier", BOTH, "ignored (not logged)"),
    OpenAIField("partial_images", BOTH, "ignored (no streaming here)"),
    OpenAIField("input_fidelity", (EDITS,), "ignored"),
    OpenAIField("complexity", BOTH, "ignored"),
    OpenAIField("frame_count", BOTH, "ignored (no GIF output)"),
    OpenAIField("frame_duration_ms", BOTH, "ignored (no GIF output)"),
    OpenAIField("svg", BOTH, "ignored (no SVG output)"),
)
FIELDS_OF_ROUTE = {route: tuple(spec.name for spec in OPENAI_FIELDS if route in spec.routes) for route in IMAGE_ROUTES}
# Contract fields a client may also give by their own name (extra_body) unless it gave the OpenAI field too.
NATIVE_ALIASES = {"n": ("num_images",), "size": ("width", "height"), "mask": ("mask_image",)}
# Contract fields this door cannot honour: it answers JSON, never a stream, with files in output_format.
NOT_ON_THIS_DOOR = ("preview_every",)


# --- What the handler carries through a batch ------------------------------------------------------------------

@dataclass
class RouteRejection(Rejection):
    """A request for a route or model this door does not serve: 404 with its own code (counted as not_implemented)."""

    status: int = 404
    code: str = "unknown_url"


@dataclass
class OpenAICall:
    """One request that came through this door: what to generate and how to answer it, or why it fails.

    ``request``: the contract's request (image routes); ``reply``: a ready answer (the model list);
    ``failure``: the rejection that answers it. Exactly one is set.
    """

    route: str
    request: Optional[ClientRequest] = None
    image_format: str = DEFAULT_IMAGE_FORMAT
    reply: Optional[dict] = None
    failure: Optional[Rejection] = None
    params: dict[str, str] = field(default_factory=dict)  # contract field -> the OpenAI name the client used

    def work(self):
        """What the generation engine gets: the request to generate, else this call (passed through as is)."""
        if self.request is not None:
            return self.request.generation
        return self.failure if self.failure is not None else self


@dataclass(frozen=True)
class Reply:
    """One answer: status, body, content type and headers."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = JSON_TYPE


def route_of(headers: Mapping[str, Any]) -> Optional[str]:
    """The OpenAI route of a request (``v1/images/generations``), or None when it is for the native door."""
    path = (wire.header(headers, ROUTE_HEADER) or "").strip().strip("/")
    if path == PREFIX or path.startswith(PREFIX + "/"):
        return path
    return None


# --- The door ---------------------------------------------------------------------------------------------------

class OpenAIDoor:
    """The OpenAI Images API of one loaded model."""

    def __init__(self, contract: Contract, model_name: str, created: int):
        self.contract = contract
        self.model_name = model_name
        self.model = {"id": model_name, "object": "model", "created": created, "owned_by": "torchserve"}

    def read(self, route: str, row: Mapping[str, Any], headers: Mapping[str, Any]) -> OpenAICall:
        """One request of this door -> an OpenAICall; raises Rejection (its field already an OpenAI name)."""
        if wire.header(headers, "explain") == "True":  # /explanations/{model}/{version}/v1/...
            raise Rejection(NOT_IMPLEMENTED, "explanations are not offered for image generation; POST to "
                            "/predictions/{model}/{version}/v1/images/generations instead")
        if route == MODELS:
            return OpenAICall(route, reply={"object": "list", "data": [self.model]})
        if route.startswith(MODELS + "/"):
            name = route[len(MODELS) + 1:]
            if name != self.model_name:
                raise RouteRejection(NOT_IMPLEMENTED, f"the model {shown(name)} does not exist here: this URL serves "
                                     f"{self.model_name!r}", field="model", code="model_not_found")
            return OpenAICall(route, reply=self.model)
        if route not in IMAGE_ROUTES:
            raise RouteRejection(NOT_IMPLEMENTED, f"no route {shown('/' + route)} here; this server offers POST "
                                 f"/{GENERATIONS}, POST /{EDITS} and GET /{MODELS}")
        body, from_form = wire.read_body(row, wire.header(headers, "content-type"))
        if from_form:  # the SDK sends a list of images as image[]
            body = {("image" if key == "image[]" else key): value for key, value in body.items()}
        fields, image_format, params = self.translate(route, body, from_form)
        try:
            request = self.contract.parse(fields, from_form)
        except Rejection as rejection:
            raise openai_rejection(rejection, params, body) from None
        return OpenAICall(route, request, image_format, params=params)

    def translate(self, route: str, body: Mapping[str, Any], from_form: bool) -> tuple[dict, str, dict]:
        """An OpenAI body -> (the contract's fields, the image file format, contract field -> OpenAI name).

        Only this door's own values are judged here (the names, response_format, output_format, size's
        spelling, stream, background); everything the contract declares is left to ``Contract.parse``.
        """
        given = {key: value for key, value in body.items() if _given(value, from_form)}
        own = FIELDS_OF_ROUTE[route]
        unknown = [key for key in given if key not in own and key not in self.contract.declared]
        if unknown:
            listed = ", ".join(shown(key) for key in unknown[:MAX_UNKNOWN_SHOWN])
            more = f" and {len(unknown) - MAX_UNKNOWN_SHOWN} more" if len(unknown) > MAX_UNKNOWN_SHOWN else ""
            native = [name for name in self.contract.fields if name not in own and name not in NOT_ON_THIS_DOOR]
            raise invalid(unknown[0][:80], f"unknown field(s) {listed}{more}; /{route} takes {list(own)}, and this "
                          f"server's own fields in extra_body: {native}", reason=UNKNOWN_FIELD)
        for name, aliases in NATIVE_ALIASES.items():
            both = [alias for alias in aliases if alias in given]
            if name in given and name in own and both:
                raise invalid(name, f"{name} and {both[0]} say the same thing; give only one of them")
        for name in NOT_ON_THIS_DOOR:
            if name in given:
                raise invalid(name, f"{name} needs a stream, which the OpenAI API here does not offer; use POST "
                              "/predictions/{model} with \"stream\": true for progress")

        _choose("response_format", given, ("b64_json",), "b64_json", "this server does not store files, so it "
                "gives no URLs; use response_format b64_json (the default) and decode the base64 image")
        image_format = _choose("output_format", given, IMAGE_FORMATS, DEFAULT_IMAGE_FORMAT,
                               f"each image comes back as a file in b64_json: use one of {list(IMAGE_FORMATS)}")
        _choose("background", given, ("auto", "opaque"), "auto",
                "this model makes opaque images only; leave background out, or use auto or opaque")
        if route == EDITS and "image" not in given:
            raise invalid("image", "image is required: the picture to edit, as the form file image (or base64 in "
                          "a JSON body)")
        if "stream" in given and self.contract.declared["stream"].type.read("stream", given["stream"], from_form):
            raise invalid("stream", "stream is not offered by the OpenAI API here; leave it out (or false), or use "
                          "POST /predictions/{model} with \"stream\": true for NDJSON progress")
        if "markup" in given:
            raise invalid("markup", "markup is not supported; send a mask (transparent where to edit) instead")

        fields = {name: value for name, value in given.items() if name in self.contract.declared
                  and name not in ("output_format", "stream")}
        params = {}
        if "n" in given:
            fields["num_images"], params["num_images"] = given["n"], "n"
        if "size" in given:
            size = _size(given["size"])
            if size is not None:
                fields["width"], fields["height"] = size
                params["width"] = params["height"] = "size"
        if "mask" in given and route == EDITS:
            fields["mask_image"], params["mask_image"] = self._mask(given["mask"]), "mask"
        fields["output_format"] = CONTRACT_FORMAT
        return fields, image_format, params

    def _mask(self, value):
        """An OpenAI mask (transparent = edit) -> a PNG mask as the contract reads it (white = repaint)."""
        spec = self.contract.fields.get("mask_image")
        if spec is None:  # no inpainting here: the contract says so for mask_image
            return value
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value)
        elif not isinstance(value, str):
            raise invalid("mask", f"mask must be a PNG file (or base64 in a JSON body), got {shown(value)}")
        rgba = decode_image("mask", value, spec.type.max_pixels, "RGBA")
        repaint = np.asarray(rgba.getchannel("A")) == 0
        if not repaint.any():
            raise invalid("mask", "mask has no fully transparent pixels: an OpenAI mask is transparent (alpha 0) "
                          "where the image should change; or send mask_image (white = repaint) in extra_body")
        buffer = io.BytesIO()
        Image.fromarray(np.where(repaint, 255, 0).astype(np.uint8), mode="L").save(buffer, format="PNG",
                                                                                    compress_level=1)
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    # -- answers --

    def respond(self, call: OpenAICall, outcome) -> Reply:
        """The answer to one call, from what the engine made of its work (a GenerationResult or a Rejection)."""
        if call.failure is not None or isinstance(outcome, Rejection):
            failure = call.failure if call.failure is not None else outcome
            return error_reply(failure if failure.field not in call.params else
                               Rejection(failure.reason, failure.message, call.params[failure.field]))
        if call.reply is not None:
            return Reply(200, json.dumps(call.reply).encode())
        generation = outcome.request
        parameters = outcome.parameters()
        document = {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(image_file(image, call.image_format, parameters, seed))
                      .decode("ascii"), "revised_prompt": generation.model_prompt}
                     for image, seed in zip(outcome.images, generation.seeds)],
            "background": "opaque",
            "output_format": call.image_format,
            "size": f"{generation.width}x{generation.height}",
        }
        return Reply(200, json.dumps(document).encode(), wire.result_headers(list(generation.seeds), outcome.nsfw))


def openai_rejection(rejection: Rejection, params: Mapping[str, str], body: Mapping[str, Any]) -> Rejection:
    """A contract rejection with its field named as the client named it (num_images -> n, width -> size)."""
    param = params.get(rejection.field)
    if param is None:
        return rejection
    value = body.get(param)
    origin = param if isinstance(value, (bytes, bytearray)) or param == "mask" else f"{param}={shown(value)}"
    return Rejection(rejection.reason, f"{rejection.message} (from {origin})", param)


def error_status(rejection: Rejection) -> int:
    return rejection.status if isinstance(rejection, RouteRejection) else wire.status_of(rejection)


def error_object(rejection: Rejection) -> dict:
    """OpenAI's error object: ``{"message", "type", "param", "code"}``; code is the failure kind."""
    status = error_status(rejection)
    return {"message": rejection.message, "type": "invalid_request_error" if status < 500 else "server_error",
            "param": rejection.field, "code": rejection.code if isinstance(rejection, RouteRejection)
            else rejection.reason}


def error_reply(rejection: Rejection) -> Reply:
    """An error answer. The SDK retries 5xx by itself: only out of memory is worth another try."""
    status = error_status(rejection)
    headers = {"x-should-retry": "false"} if status >= 500 and rejection.reason != OUT_OF_MEMORY else {}
    return Reply(status, json.dumps({"error": error_object(rejection)}).encode(), headers)


def _given(value, from_form: bool) -> bool:
    if value is None:
        return False
    return not (from_form and isinstance(value, str) and value.strip() == "")


def _choose(name: str, given: Mapping[str, Any], allowed: tuple[str, ...], default: str, why: str) -> str:
    """One of this door's own choice fields: its value, the default when left out, else a 400 saying why."""
    value = given.get(name, default)
    if value not in allowed:
        raise invalid(name, f"{name} {shown(value)} is not offered: {why}", reason=INVALID_FIELD)
    return value


def _size(value) -> Optional[tuple[int, int]]:
    """``"512x768"`` -> (512, 768); ``"auto"`` -> None (the model's defaults). The contract judges the numbers."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    match = SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise invalid("size", f"size must be 'auto' or WIDTHxHEIGHT in pixels, e.g. '512x512', got {shown(value)}")
    return int(match.group(1)), int(match.group(2))


def archive_created(manifest) -> int:
    """When the archive was built (a .mar MANIFEST's createdOn, dd/mm/YYYY HH:MM:SS), as Unix time; else now."""
    try:
        return int(datetime.strptime(manifest["createdOn"], "%d/%m/%Y %H:%M:%S").timestamp())
    except (TypeError, KeyError, ValueError):
        return int(time.time())
