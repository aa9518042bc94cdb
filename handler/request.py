"""Turn one TorchServe request (body + headers) into a validated GenerationRequest, or a RequestError.

Parsing happens once, at the edge: everything after it trusts the typed request. Every error names the
field, the value received and what is allowed.
"""

import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from PIL import Image

from handler.capabilities import ModelCapabilities
from handler.errors import RequestError, invalid
from handler.images import decode_image
from handler.schedulers import DISCRETE, FLOW_MATCHING, scheduler_names
from handler.settings import OUTPUT_FORMATS, HandlerSettings, SettingsError

MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 30.0
ACCEPT_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/webp": "webp",
    "application/x-npy": "npy",
}
SINGLE_IMAGE_FORMATS = ("png", "jpeg", "webp")
FIELD_NAMES = (
    "prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "width", "height", "seed",
    "num_images", "scheduler", "output_format", "image", "mask_image", "strength",
)


@dataclass(frozen=True)
class GenerationRequest:
    """One client request, validated: what to generate and how to return it."""

    prompt: str
    negative_prompt: Optional[str]
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    seeds: tuple[int, ...]
    scheduler: Optional[str]
    output_format: str
    image: Optional[Image.Image] = field(default=None, compare=False)
    mask_image: Optional[Image.Image] = field(default=None, compare=False)
    strength: Optional[float] = None

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def task(self) -> str:
        if self.mask_image is not None:
            return "inpainting"
        if self.image is not None:
            return "image-to-image"
        return "text-to-image"

    @property
    def pixels(self) -> int:
        """The memory-relevant size: pixels of every image this request makes."""
        return self.width * self.height * self.num_images

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call."""
        return (self.task, self.width, self.height, self.num_inference_steps, self.guidance_scale,
                self.scheduler, self.strength, self.negative_prompt is not None)

    def parameters(self) -> dict[str, Any]:
        """The generation parameters a client needs to make the same images again."""
        parameters = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "width": self.width,
            "height": self.height,
            "seeds": list(self.seeds),
            "scheduler": self.scheduler,
            "task": self.task,
        }
        if self.strength is not None:
            parameters["strength"] = self.strength
        return parameters


@dataclass(frozen=True)
class FieldDoc:
    """One row of the README's API table, produced from the same numbers the parser uses."""

    name: str
    default: str
    allowed: str


def describe_fields(settings: HandlerSettings) -> list[FieldDoc]:
    """The request contract as table rows; a test checks the README against it."""
    side = f"multiple of 8, {settings.min_side} .. {settings.max_side}; width*height <= {settings.max_pixels}"
    return [
        FieldDoc("prompt", "required", f"non-empty string, at most {settings.max_prompt_length} characters"),
        FieldDoc("negative_prompt", "none", f"string, at most {settings.max_prompt_length} characters"),
        FieldDoc("num_inference_steps", str(settings.default_steps), f"integer, 1 .. {settings.max_steps}"),
        FieldDoc("guidance_scale", str(settings.default_guidance_scale), f"number, 0 .. {MAX_GUIDANCE:g}"),
        FieldDoc("width", str(settings.default_width), side),
        FieldDoc("height", str(settings.default_height), side),
        FieldDoc("seed", "random", f"integer, 0 .. {MAX_SEED}; image i uses seed + i"),
        FieldDoc("num_images", "1", f"integer, 1 .. {settings.max_images}; width*height*num_images <= {settings.max_request_pixels}"),
        FieldDoc("scheduler", "the pipeline's", ", ".join(scheduler_names(DISCRETE)) + "; SD3 and Flux: "
                 + ", ".join(scheduler_names(FLOW_MATCHING))),
        FieldDoc("output_format", settings.default_output_format, ", ".join(OUTPUT_FORMATS) + "; or the Accept header"),
        FieldDoc("image", "none", f"base64 or data URL of a PNG, JPEG or WebP, at most {settings.max_input_image_pixels} pixels"),
        FieldDoc("mask_image", "none", "like image; white pixels are repainted; needs image"),
        FieldDoc("strength", str(settings.default_strength), "number, > 0 .. 1; only with image"),
    ]


class RequestParser:
    """Validates request bodies against the settings and capabilities of the loaded model."""

    def __init__(self, settings: HandlerSettings, capabilities: ModelCapabilities = ModelCapabilities()):
        multiple = capabilities.size_multiple
        for name in ("default_width", "default_height", "min_side"):
            if getattr(settings, name) % multiple:
                raise SettingsError(f"model-config.yaml handler setting {name} must be a multiple of {multiple} "
                                    f"for {capabilities.pipeline_class}, got {getattr(settings, name)}")
        self.settings = settings
        self.capabilities = capabilities

    def parse(self, row: Mapping[str, Any], headers: Mapping[str, str]) -> GenerationRequest:
        """Parse one TorchServe request row; raises RequestError for anything the client must fix."""
        fields_, from_form = body_fields(row, _header(headers, "content-type"))
        return self._validate(fields_, from_form, _header(headers, "accept"))

    def _validate(self, body: dict[str, Any], from_form: bool, accept: Optional[str]) -> GenerationRequest:
        settings = self.settings
        unknown = sorted(set(body) - set(FIELD_NAMES))
        if unknown:
            raise invalid(unknown[0], f"unknown field(s) {unknown}; known fields: {list(FIELD_NAMES)}",
                          reason="unknown_field")
        values = _Values(body, from_form)
        capabilities = self.capabilities
        prompt = values.text("prompt", settings.max_prompt_length, required=True)
        negative_prompt = values.text("negative_prompt", settings.max_prompt_length, required=False)
        if negative_prompt is not None and not capabilities.negative_prompt:
            raise invalid("negative_prompt", f"negative_prompt is not supported by {capabilities.pipeline_class}: "
                          "the model has no classifier-free guidance; leave the field out")
        steps = values.integer("num_inference_steps", settings.default_steps, 1, settings.max_steps)
        guidance = values.number("guidance_scale", settings.default_guidance_scale, 0.0, MAX_GUIDANCE)
        num_images = values.integer("num_images", 1, 1, settings.max_images)
        seed = values.integer("seed", None, 0, MAX_SEED)
        scheduler = values.choice("scheduler", None, capabilities.schedulers)
        output_format = values.choice("output_format", _format_from_accept(accept) or settings.default_output_format,
                                      OUTPUT_FORMATS)

        image = mask_image = strength = None
        for field_name, task in (("image", "image-to-image"), ("mask_image", "inpainting")):
            if values.present(field_name) and task not in capabilities.tasks:
                raise invalid(field_name, f"{task} is not supported by {capabilities.pipeline_class}; "
                              f"supported: {list(capabilities.tasks)}", reason="unsupported_task")
        if values.present("image"):
            image = decode_image("image", body["image"], settings.max_input_image_pixels, "RGB")
            strength = values.number("strength", settings.default_strength, 0.0, 1.0, low_exclusive=True)
        elif values.present("strength"):
            raise invalid("strength", "strength only applies with an input image; add the field image")
        if values.present("mask_image"):
            if image is None:
                raise invalid("mask_image", "mask_image needs an input image in the field image")
            mask_image = decode_image("mask_image", body["mask_image"], settings.max_input_image_pixels, "L")
        if strength is not None and int(steps * strength) < 1:
            raise invalid("strength", f"num_inference_steps x strength is {steps} x {strength} and must be at "
                          "least 1 (the image is denoised for that many steps); raise either")

        default_width, default_height = settings.default_width, settings.default_height
        if image is not None:
            multiple = capabilities.size_multiple
            default_width, default_height = (side // multiple * multiple for side in image.size)
        width = self._side(values, "width", default_width, image is not None)
        height = self._side(values, "height", default_height, image is not None)
        if width * height > settings.max_pixels:
            raise invalid("width", f"width x height is {width}x{height} = {width * height} pixels; "
                          f"at most {settings.max_pixels} pixels are allowed")
        if width * height * num_images > settings.max_request_pixels:
            raise invalid("num_images", f"width x height x num_images is {width * height * num_images}; "
                          f"at most {settings.max_request_pixels} per request")
        if output_format in SINGLE_IMAGE_FORMATS and num_images > 1:
            raise invalid("output_format", f"output_format {output_format} holds one image but num_images is "
                          f"{num_images}; use json, npy or array for several images")

        first_seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
        seeds = tuple((first_seed + offset) % (MAX_SEED + 1) for offset in range(num_images))
        if image is not None:
            image = image.resize((width, height), Image.Resampling.LANCZOS) if image.size != (width, height) else image
        if mask_image is not None and mask_image.size != (width, height):
            mask_image = mask_image.resize((width, height), Image.Resampling.NEAREST)
        return GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
            width=width, height=height, seeds=seeds, scheduler=scheduler, output_format=output_format,
            image=image, mask_image=mask_image, strength=strength,
        )

    def _side(self, values: "_Values", name: str, default: int, from_image: bool) -> int:
        settings = self.settings
        value = values.integer(name, default, settings.min_side, settings.max_side,
                               multiple_of=self.capabilities.size_multiple)
        if from_image and not values.present(name) and not settings.min_side <= value <= settings.max_side:
            raise invalid(name, f"the input image's {name} ({value}) is outside {settings.min_side} .. "
                          f"{settings.max_side}; pass {name} to resize it")
        return value


def body_fields(row: Mapping[str, Any], content_type: Optional[str]) -> tuple[dict[str, Any], bool]:
    """The request's fields and whether they came from a form (whose values are all strings).

    TorchServe hands a JSON body over as a dict, a text/plain body as bytes, and an urlencoded or multipart
    form as one key per field (no ``body``). A text body is the prompt, as in TorchServe's upstream example;
    a text body that is a JSON object, or any body declared as JSON, is read as JSON.
    """
    is_form = bool(set(row) - {"body", "data"})  # a form field named data or body stays a field
    payload = None if is_form else row.get("body", row.get("data"))
    if payload is None:
        form = dict(row)
        if "prompt" not in form:
            raise invalid("prompt", "no prompt found: send the prompt as a text/plain body, a JSON object "
                          "{\"prompt\": ...} with Content-Type: application/json, or a form field prompt=...",
                          reason="missing_prompt")
        return {key: _form_text(key, value) for key, value in form.items()}, True
    if isinstance(payload, dict):
        return payload, False
    if isinstance(payload, (bytes, bytearray)):
        try:
            text = bytes(payload).decode("utf-8")
        except UnicodeDecodeError:
            raise invalid("prompt", "the request body is not valid UTF-8 text", reason="invalid_body") from None
    elif isinstance(payload, str):
        text = payload
    else:
        raise invalid(None, f"the request body must be JSON or text, got {type(payload).__name__}",
                      reason="invalid_body")
    declared_json = content_type is not None and "json" in content_type.lower()
    if declared_json or text.lstrip().startswith("{"):
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError) as error:  # bad syntax, over-long integers, deep nesting
            if declared_json:
                raise invalid(None, f"the body is not valid JSON: {_shown(error)}", reason="invalid_json") from None
            parsed = None
        if isinstance(parsed, dict):
            return parsed, False
        if declared_json:
            raise invalid(None, f"the JSON body must be an object like {{\"prompt\": ...}}, got {type(parsed).__name__}",
                          reason="invalid_json")
    return {"prompt": text.strip()}, False


def _form_text(key: str, value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise invalid(key, f"form field {key} is not valid UTF-8", reason="invalid_body") from None
    return str(value)


def _header(headers: Mapping[str, str], name: str) -> Optional[str]:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _format_from_accept(accept: Optional[str]) -> Optional[str]:
    """The output format an Accept header asks for, if it names one of ours."""
    if not accept:
        return None
    for media_range in accept.split(","):
        media_type = media_range.split(";", 1)[0].strip().lower()
        if media_type in ACCEPT_FORMATS:
            return ACCEPT_FORMATS[media_type]
    return None


class _Values:
    """Typed reads of body fields, each failing with the field name, the value received and the range."""

    def __init__(self, body: dict[str, Any], from_form: bool):
        self.body = body
        self.from_form = from_form

    def present(self, name: str) -> bool:
        """Whether the client gave the field (an empty form field counts as left out)."""
        return self._get(name) is not None

    def _get(self, name: str):
        value = self.body.get(name)
        if self.from_form and isinstance(value, str) and value.strip() == "":
            return None
        return value

    def text(self, name: str, max_length: int, required: bool) -> Optional[str]:
        value = self._get(name)
        if value is None:
            if required:
                raise invalid(name, f"{name} is required: a non-empty string", reason="missing_prompt")
            return None
        if not isinstance(value, str):
            raise invalid(name, f"{name} must be a string, got {_shown(value)}")
        if required and not value.strip():
            raise invalid(name, f"{name} must not be empty", reason="missing_prompt")
        if len(value) > max_length:
            raise invalid(name, f"{name} has {len(value)} characters; at most {max_length} are allowed")
        if "\x00" in value:
            raise invalid(name, f"{name} must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): the tokenizer would fail the batch
            raise invalid(name, f"{name} is not valid Unicode text (it holds a lone surrogate)") from None
        return value

    def integer(self, name: str, default, low: int, high: int, multiple_of: int = 1):
        value = self._get(name)
        if value is None:
            return default
        if self.from_form and isinstance(value, str):
            value = _parse_form_number(name, value, int)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        rule = f"a multiple of {multiple_of} between {low} and {high}" if multiple_of > 1 else f"an integer between {low} and {high}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(name, f"{name} must be {rule}, got {_shown(value)}")
        if not low <= value <= high or value % multiple_of:
            raise invalid(name, f"{name} must be {rule}, got {_shown(value)}")
        return value

    def number(self, name: str, default: float, low: float, high: float, low_exclusive: bool = False) -> float:
        value = self._get(name)
        if value is None:
            return default
        if self.from_form and isinstance(value, str):
            value = _parse_form_number(name, value, float)
        lower = f"greater than {low:g}" if low_exclusive else f"at least {low:g}"
        rule = f"a finite number {lower} and at most {high:g}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid(name, f"{name} must be {rule}, got {_shown(value)}")
        try:
            value = float(value)
        except OverflowError:
            raise invalid(name, f"{name} must be {rule}, got {_shown(value)}") from None
        if not math.isfinite(value) or value > high or value < low or (low_exclusive and value == low):
            raise invalid(name, f"{name} must be {rule}, got {value}")
        return value

    def choice(self, name: str, default: Optional[str], allowed: tuple[str, ...]) -> Optional[str]:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, str) or value.lower() not in allowed:
            raise invalid(name, f"{name} must be one of {list(allowed)}, got {_shown(value)}")
        return value.lower()


def _parse_form_number(name: str, text: str, kind: type):
    try:
        return kind(text.strip())
    except ValueError:
        raise invalid(name, f"{name} must be a number, got {_shown(text)}") from None


def _shown(value: Any) -> str:
    """A value for an error message, cut short: a client's 1 MB string must not echo back whole."""
    try:
        shown = repr(value)
    except (ValueError, RecursionError):  # integers over Python's digit limit, deeply nested values
        shown = f"a {type(value).__name__} too large to show"
    return shown if len(shown) <= 80 else shown[:77] + "..."
