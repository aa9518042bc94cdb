"""The OpenAI Images API: ``/predictions/{model}/{version}/v1/...``, for the official ``openai`` SDK.

TorchServe sends any request on a path below a model's version to the handler, whatever its HTTP method, with
the rest of the path in the request header ``url_path`` (``v1/images/generations``) and without the method;
``handler/protocols/routing.py`` sends those whose ``url_path`` starts with ``v1`` here.

The protocol translates an OpenAI body into the contract's fields and lets ``Contract.parse`` judge them: every
range, default and message comes from the contract. It only maps names (``n`` is ``num_images``,
``size`` is ``width`` and ``height``, an OpenAI ``mask`` becomes a white-=-repaint ``mask_image``) and maps a
failure's field back to the name the client used. It answers OpenAI's ``ImagesResponse``, model list and
error object. Nothing here knows TorchServe: the handler hands it requests and sends the replies.
"""

import base64
import io
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
from PIL import Image

from handler.core.contract import Contract
from handler.core.encoding import SINGLE_IMAGE_FORMATS, image_file
from handler.core.failures import (
    INVALID_FIELD, NOT_IMPLEMENTED, OUT_OF_MEMORY, Rejection, invalid, shown, unknown_names,
)
from handler.core.fields import Boolean, is_given
from handler.core.images import decode_image
from handler.core.prepare import RESIZE_HINT
from handler.core.requests import GenerationRequest
from handler.protocols.http import (
    Call, HttpRequest, Protocol, Reply, RouteRejection, ServedModel, failure_of, result_headers, status_of,
)

PREFIX = "v1"
GENERATIONS, EDITS, MODELS = "v1/images/generations", "v1/images/edits", "v1/models"
IMAGE_ROUTES = (GENERATIONS, EDITS)
IMAGE_FORMATS = SINGLE_IMAGE_FORMATS  # the files b64_json can carry: png, jpeg, webp
DEFAULT_IMAGE_FORMAT = "png"
SIZE = re.compile(r"\s*(\d{1,9})\s*[xX]\s*(\d{1,9})\s*")


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
    OpenAIField("image", (EDITS,), "`image` (the uploaded PNG, JPEG or WebP file; one image: `image[]` with one file "
                                   "works too; two images are refused (400))"),
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
# Contract fields this API cannot honour: it answers JSON, never a stream, with files in output_format.
NOT_OFFERED = ("preview_every",)


# --- What the handler carries through a batch ------------------------------------------------------------------

@dataclass(kw_only=True)
class OpenAICall(Call):
    """One request of this API: what to generate and how to answer it.

    ``generation``: what to generate (image routes); ``reply``: a ready answer (the model list).
    """

    route: str = ""
    generation: Optional[GenerationRequest] = None
    image_format: str = DEFAULT_IMAGE_FORMAT
    reply: Optional[dict] = None
    params: dict[str, str] = field(default_factory=dict)  # contract field -> the OpenAI name the client used

    def requests(self) -> list[GenerationRequest]:
        return [self.generation] if self.generation is not None else []


def route_of(request: HttpRequest) -> Optional[str]:
    """The OpenAI route of a request (``v1/images/generations``), or None when it is not under ``v1``."""
    return request.route if request.is_under(PREFIX) else None


# --- The protocol -----------------------------------------------------------------------------------------------

class OpenAIProtocol(Protocol):
    """The OpenAI Images API of one loaded model."""

    call_type = OpenAICall

    def __init__(self, contract: Contract, model: ServedModel):
        super().__init__(contract, model)
        self.listed = {"id": model.name, "object": "model", "created": model.created, "owned_by": "torchserve"}

    def read(self, request: HttpRequest) -> OpenAICall:
        """One request of this API -> an OpenAICall; raises Rejection (its field already an OpenAI name)."""
        route = route_of(request) or ""
        request.refuse_explanations("POST to /predictions/{model}/{version}/v1/images/generations instead")
        if route == MODELS:
            return OpenAICall(route=route, reply={"object": "list", "data": [self.listed]})
        if route.startswith(MODELS + "/"):
            name = route[len(MODELS) + 1:]
            if name != self.model.name:
                raise RouteRejection(NOT_IMPLEMENTED, f"the model {shown(name)} does not exist here: this URL serves "
                                     f"{self.model.name!r}", field="model", code="model_not_found")
            return OpenAICall(route=route, reply=self.listed)
        if route not in IMAGE_ROUTES:
            raise RouteRejection(NOT_IMPLEMENTED, f"no route {shown('/' + route)} here; this server offers POST "
                                 f"/{GENERATIONS}, POST /{EDITS} and GET /{MODELS}")
        try:
            body, from_form = request.fields()
        except Rejection as rejection:  # two image[] parts: the SDK's list of images
            if rejection.field != "image[]":
                raise
            raise Rejection(rejection.reason, rejection.message, "image") from None
        if from_form and "image[]" in body:  # the SDK sends a list of images as image[]
            if "image" in body:
                raise invalid("image", "the form sends both image and image[]; send one image, once")
            body = {("image" if key == "image[]" else key): value for key, value in body.items()}
        fields, image_format, params = self.translate(route, body, from_form)
        try:
            parsed = self.contract.parse(fields, from_form)
        except Rejection as rejection:
            raise openai_rejection(rejection, params, body) from None
        return OpenAICall(route=route, generation=parsed, image_format=image_format, params=params)

    def translate(self, route: str, body: Mapping[str, Any], from_form: bool) -> tuple[dict, str, dict]:
        """An OpenAI body -> (the contract's fields, the image file format, contract field -> OpenAI name).

        Only this API's own values are judged here (the names, response_format, output_format, size's
        spelling, stream, background); everything the contract declares is left to ``Contract.parse``.
        """
        given = {key: value for key, value in body.items() if is_given(value, from_form)}
        own = FIELDS_OF_ROUTE[route]
        unknown = [key for key in given if key not in own and key not in self.contract.declared
                   and key not in NOT_OFFERED]
        if unknown:
            native = [name for name in self.contract.fields if name not in own and name not in NOT_OFFERED]
            raise unknown_names(unknown, "field", f"; /{route} takes {list(own)}, and this server's own fields in "
                                f"extra_body: {native}")
        image_format = self._judge_own_values(route, given, from_form)
        fields = {name: value for name, value in given.items() if name in self.contract.declared}
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
        return fields, image_format, params

    def _judge_own_values(self, route: str, given: Mapping[str, Any], from_form: bool) -> str:
        """Refuse what this API does not offer, naming the OpenAI field; -> the image file format."""
        own = FIELDS_OF_ROUTE[route]
        for name, aliases in NATIVE_ALIASES.items():
            both = [alias for alias in aliases if alias in given]
            if name in given and name in own and both:
                raise invalid(name, f"{name} and {both[0]} say the same thing; give only one of them")
        for name in NOT_OFFERED:
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
        if "stream" in given and Boolean().read("stream", given["stream"], from_form):
            raise invalid("stream", "stream is not offered by the OpenAI API here; leave it out (or false), or use "
                          "POST /predictions/{model} with \"stream\": true for NDJSON progress")
        if "markup" in given:
            raise invalid("markup", "markup is not supported; send a mask (transparent where to edit) instead")
        return image_format

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

    def respond(self, call: OpenAICall, outcomes: list) -> Reply:
        """The answer to one call, from what the engine made of its request (a GenerationResult or a Rejection)."""
        failure = failure_of(call, outcomes)
        if failure is not None:
            return error_reply(failure if failure.field not in call.params else
                               Rejection(failure.reason, failure.message, call.params[failure.field]))
        if call.reply is not None:
            return Reply(200, json.dumps(call.reply).encode())
        (outcome,) = outcomes
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
        return Reply(200, json.dumps(document).encode(), result_headers(list(generation.seeds), outcome.nsfw))


def openai_rejection(rejection: Rejection, params: Mapping[str, str], body: Mapping[str, Any]) -> Rejection:
    """A contract rejection with its field named as the client named it (num_images -> n, width -> size)."""
    param = params.get(rejection.field)
    if param is None:
        if RESIZE_HINT in rejection.message:  # an input image that does not fit, and no size was sent
            return Rejection(rejection.reason, rejection.message.replace(
                RESIZE_HINT, "send size (WIDTHxHEIGHT, e.g. '512x512') to resize it"), rejection.field)
        return rejection
    value = body.get(param)
    origin = param if isinstance(value, (bytes, bytearray)) or param == "mask" else f"{param}={shown(value)}"
    return Rejection(rejection.reason, f"{rejection.message} (from {origin})", param)


def error_object(rejection: Rejection) -> dict:
    """OpenAI's error object: ``{"message", "type", "param", "code"}``; code is the failure kind."""
    status = status_of(rejection)
    return {"message": rejection.message, "type": "invalid_request_error" if status < 500 else "server_error",
            "param": rejection.field, "code": rejection.code if isinstance(rejection, RouteRejection)
            else rejection.reason}


def error_reply(rejection: Rejection) -> Reply:
    """An error answer. The SDK retries 5xx by itself: only out of memory is worth another try."""
    status = status_of(rejection)
    headers = {"x-should-retry": "false"} if status >= 500 and rejection.reason != OUT_OF_MEMORY else {}
    return Reply(status, json.dumps({"error": error_object(rejection)}).encode(), headers, failure=rejection)


def _choose(name: str, given: Mapping[str, Any], allowed: tuple[str, ...], default: str, why: str) -> str:
    """One of this API's own choice fields: its value, the default when left out, else a 400 saying why."""
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
