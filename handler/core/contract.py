"""The request contract: every field declared once, and everything derived from that declaration.

Each ``FieldSpec`` below says a field's type, its default, its range or choices (numbers that come from the
model's settings or the loaded pipeline's capabilities), which tasks or families it applies to, and what it
means. ``Contract`` binds those declarations to one loaded model and derives from them

- ``parse``: a body's fields -> a typed ``ClientRequest``, or a ``Rejection`` naming the field, the value and
  the allowed range (cheap checks first: every scalar is checked before any image is decoded);
- ``json_schema``: the JSON Schema (draft 2020-12) of the bodies this model accepts;
- ``field_table``: the docs' API table (scripts/gen_docs_tables.py writes it into docs/api.md).

Nothing here knows HTTP or TorchServe: a protocol (``handler/protocols/``) turns its body into a mapping of fields.
"""

import json
import math
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Union

from PIL import Image

from handler.core.capabilities import IMAGE_TO_IMAGE, INPAINTING, TEXT_TO_IMAGE, ModelCapabilities
from handler.core.controlnets import (
    CANNY, CANNY_HIGH, CANNY_LOW, CANNY_MAX_THRESHOLD, MAX_CONDITIONING_SCALE, NO_PREPROCESS, PREPROCESSORS,
    ControlCondition, canny_edges,
)
from handler.core.encoding import OUTPUT_FORMATS, SINGLE_IMAGE_FORMATS
from handler.core.failures import MISSING_PROMPT, UNSUPPORTED_TASK, Rejection, invalid, shown, unknown_names
from handler.core.images import decode_image
from handler.core.outpaint import SIDES, Margins, extend_canvas
from handler.core.settings import HandlerSettings, SettingsError

MAX_SEED = 2**63 - 1  # torch.Generator seeds are 64-bit; JSON clients keep them as signed integers
LORA_SCALE_MIN, LORA_SCALE_MAX, LORA_SCALE_DEFAULT = -2.0, 2.0, 1.0  # negative scales steer away ("sliders")
STREAM_DEFAULT_FORMAT = "png"


# --- Where a bound comes from --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """A number or choice taken from the model's settings (model-config.yaml ``handler:``)."""

    name: str


@dataclass(frozen=True)
class Capability:
    """A number or choice taken from the loaded pipeline (its size multiple, its schedulers)."""

    name: str


Bound = Union[int, float, str, tuple, Setting, Capability, None]


def resolve(bound: Bound, settings: HandlerSettings, capabilities: ModelCapabilities):
    if isinstance(bound, Setting):
        return getattr(settings, bound.name)
    if isinstance(bound, Capability):
        return getattr(capabilities, bound.name)
    return bound


# --- Field types: how a value is read, described and put in a schema ----------------------------------------

@dataclass(frozen=True)
class Text:
    max_length: Bound
    required: bool = False

    def rule(self) -> str:
        return f"{'a non-empty' if self.required else 'a'} string of at most {self.max_length} characters"

    def read(self, name: str, value, from_form: bool) -> str:
        if not isinstance(value, str):
            raise invalid(name, f"{name} must be {self.rule()}, got {shown(value)}")
        if self.required and not value.strip():
            raise invalid(name, f"{name} must not be empty", reason=MISSING_PROMPT)
        if len(value) > self.max_length:
            raise invalid(name, f"{name} has {len(value)} characters; at most {self.max_length} are allowed")
        if "\x00" in value:
            raise invalid(name, f"{name} must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): the tokenizer would fail the batch
            raise invalid(name, f"{name} is not valid Unicode text (it holds a lone surrogate)") from None
        return value

    def schema(self) -> dict:
        # As read() checks: no NUL and no lone surrogate anywhere, and (if required) one non-space character.
        allowed = r"[^\x00\ud800-\udfff]"
        pattern = rf"^{allowed}*[^\s\x00\ud800-\udfff]{allowed}*$" if self.required else rf"^{allowed}*$"
        return {"type": "string", "maxLength": self.max_length, "pattern": pattern}


@dataclass(frozen=True)
class Integer:
    minimum: Bound
    maximum: Bound
    multiple_of: Bound = 1

    def rule(self) -> str:
        if self.multiple_of > 1:
            return f"a multiple of {self.multiple_of} between {self.minimum} and {self.maximum}"
        return f"an integer between {self.minimum} and {self.maximum}"

    def read(self, name: str, value, from_form: bool) -> int:
        if from_form and isinstance(value, str):
            value = _form_number(name, value, int)
        if isinstance(value, float) and value.is_integer():  # JSON 20.0 is the integer 20
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) \
                or not self.minimum <= value <= self.maximum or value % self.multiple_of:
            raise invalid(name, f"{name} must be {self.rule()}, got {shown(value)}")
        return value

    def schema(self) -> dict:
        schema = {"type": "integer", "minimum": self.minimum, "maximum": self.maximum}
        if self.multiple_of > 1:
            schema["multipleOf"] = self.multiple_of
        return schema


@dataclass(frozen=True)
class Number:
    minimum: Bound
    maximum: Bound
    exclusive_minimum: bool = False

    def rule(self) -> str:
        lower = f"greater than {self.minimum:g}" if self.exclusive_minimum else f"at least {self.minimum:g}"
        return f"a finite number {lower} and at most {self.maximum:g}"

    def read(self, name: str, value, from_form: bool) -> float:
        if from_form and isinstance(value, str):
            value = _form_number(name, value, float)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid(name, f"{name} must be {self.rule()}, got {shown(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer with hundreds of digits
            raise invalid(name, f"{name} must be {self.rule()}, got {shown(value)}") from None
        too_low = number <= self.minimum if self.exclusive_minimum else number < self.minimum
        if not math.isfinite(number) or too_low or number > self.maximum:
            raise invalid(name, f"{name} must be {self.rule()}, got {number}")
        return number

    def schema(self) -> dict:
        lower = "exclusiveMinimum" if self.exclusive_minimum else "minimum"
        return {"type": "number", lower: self.minimum, "maximum": self.maximum}


@dataclass(frozen=True)
class Choice:
    choices: Bound

    def rule(self) -> str:
        if not self.choices:  # a capability this model lacks, e.g. controlnet names on a model without ControlNets
            return "a name the model packs (this model packs none)"
        return f"one of {list(self.choices)}"

    def read(self, name: str, value, from_form: bool) -> str:
        if not isinstance(value, str) or value not in self.choices:
            raise invalid(name, f"{name} must be {self.rule()}, got {shown(value)}")
        return value

    def schema(self) -> dict:
        return {"type": "string", "enum": list(self.choices)}


@dataclass(frozen=True)
class Boolean:
    FORM_WORDS = {"true": True, "1": True, "false": False, "0": False}

    def rule(self) -> str:
        return "true or false"

    def read(self, name: str, value, from_form: bool) -> bool:
        if from_form and isinstance(value, str) and value.strip().lower() in self.FORM_WORDS:
            return self.FORM_WORDS[value.strip().lower()]
        if not isinstance(value, bool):
            raise invalid(name, f"{name} must be {self.rule()}, got {shown(value)}")
        return value

    def schema(self) -> dict:
        return {"type": "boolean"}


@dataclass(frozen=True)
class ImageInput:
    """An input image: base64 or a data URL in JSON, the file itself in a multipart form."""

    mode: str
    max_pixels: Bound

    def rule(self) -> str:
        return (f"a PNG, JPEG or WebP of at most {self.max_pixels} pixels: base64 or a data URL, or the file in a "
                "multipart form")

    def read(self, name: str, value, from_form: bool):
        if isinstance(value, (bytes, bytearray)) and from_form:
            return bytes(value)
        if not isinstance(value, str) or not value:
            raise invalid(name, f"{name} must be {self.rule()}, got {shown(value)}")
        return value

    def decode(self, name: str, value) -> Image.Image:
        return decode_image(name, value, self.max_pixels, self.mode)

    def schema(self) -> dict:
        return {"type": "string", "minLength": 1, "contentEncoding": "base64"}


@dataclass(frozen=True)
class LoraList:
    """LoRA adapters by name, each with a scale: ``[{"name": "...", "scale": 0.8}]`` (in a form: that JSON).

    Read into (name, scale) pairs sorted by name, so two requests naming the same set in another order share a
    pipeline call. Names only: the files are the model's (handler/model/adapters.py).
    """

    max_items: Bound
    names: Bound
    scale: Number = Number(LORA_SCALE_MIN, LORA_SCALE_MAX)

    def rule(self) -> str:
        return (f"at most {self.max_items} of {{\"name\": one of the model's LoRAs, \"scale\": {self.scale.rule()} "
                f"(default {LORA_SCALE_DEFAULT:g})}}")

    def read(self, name: str, value, from_form: bool) -> tuple[tuple[str, float], ...]:
        if from_form and isinstance(value, str):
            value = json_text(name, value, "a JSON list of {\"name\", \"scale\"} objects")
        if not isinstance(value, list) or len(value) > self.max_items:
            raise invalid(name, f"{name} must be a list of {self.rule()}, got {shown(value)}")
        chosen = {}
        for index, item in enumerate(value):
            where = f"{name}[{index}]"
            if not isinstance(item, dict) or "name" not in item or set(item) - {"name", "scale"}:
                raise invalid(name, f"{where} must be an object with a name and optionally a scale, got "
                              f"{shown(item)}")
            adapter = item["name"]
            if not isinstance(adapter, str) or adapter not in self.names:
                raise invalid(name, f"{where}.name {shown(adapter)} is not a LoRA of this model; available: "
                              f"{list(self.names)}")
            if adapter in chosen:
                raise invalid(name, f"{where}.name {adapter} is named twice; give each LoRA once")
            try:
                chosen[adapter] = self.scale.read(f"{where}.scale", item.get("scale", LORA_SCALE_DEFAULT), False)
            except Rejection as rejection:  # the same message, on the field the request named
                raise invalid(name, rejection.message) from None
        return tuple(sorted(chosen.items()))

    def schema(self) -> dict:
        adapter = {"type": "object", "required": ["name"], "additionalProperties": False,
                   "properties": {"name": {"type": "string", "enum": list(self.names)},
                                  "scale": {**self.scale.schema(), "default": LORA_SCALE_DEFAULT}}}
        return {"type": "array", "maxItems": self.max_items, "items": adapter}


@dataclass(frozen=True)
class OneOrMany:
    """A value, or a list of 1 to ``max_items`` values, each read by ``item`` (one per ControlNet)."""

    item: Any
    max_items: Bound

    def rule(self) -> str:
        return f"{self.item.rule()}, or a list of 1 to {self.max_items} of them"

    def read(self, name: str, value, from_form: bool) -> tuple:
        values = value if isinstance(value, list) else [value]
        if not 1 <= len(values) <= self.max_items:
            raise invalid(name, f"{name} must be {self.rule()}, got a list of {len(values)}")
        return tuple(self.item.read(name, one, from_form) for one in values)

    def schema(self) -> dict:
        item = self.item.schema()
        return {"anyOf": [item, {"type": "array", "items": item, "minItems": 1, "maxItems": self.max_items}]}


@dataclass(frozen=True)
class Borders:
    """Pixels to add on each side: an object with some of left, right, top and bottom."""

    maximum: Bound

    def rule(self) -> str:
        return (f"an object with some of {list(SIDES)}, each an integer between 0 and {self.maximum}, one of "
                "them above 0")

    def read(self, name: str, value, from_form: bool) -> Margins:
        if from_form and isinstance(value, str):
            value = json_text(name, value, "a JSON object")
        if not isinstance(value, dict) or set(value) - set(SIDES):
            raise invalid(name, f"{name} must be {self.rule()}, got {shown(value)}")
        sides = {}
        for side, pixels in value.items():
            if isinstance(pixels, bool) or not isinstance(pixels, int) or not 0 <= pixels <= self.maximum:
                raise invalid(name, f"{name}.{side} must be an integer between 0 and {self.maximum}, got "
                              f"{shown(pixels)}")
            sides[side] = pixels
        if not any(sides.values()):
            raise invalid(name, f"{name} must add at least one pixel on some side, got {shown(value)}")
        return Margins(**sides)

    def schema(self) -> dict:
        side = {"type": "integer", "minimum": 0, "maximum": self.maximum}
        return {"type": "object", "properties": {name: side for name in SIDES}, "additionalProperties": False,
                "minProperties": 1}


FieldType = Union[Text, Integer, Number, Choice, Boolean, ImageInput, LoraList, OneOrMany, Borders]


# --- The declaration ------------------------------------------------------------------------------------------

REQUIRED, NONE, RANDOM, PIPELINE_SCHEDULER = "required", "none", "random", "the pipeline's"


@dataclass(frozen=True)
class FieldSpec:
    """One request field. ``default`` is a value, a Setting, or one of the words above (shown as is).

    ``task``: the field exists only where the model offers that task; ``capability``: only where the loaded
    pipeline has that capability (a ModelCapabilities flag); ``requires``: other fields it needs.
    """

    name: str
    type: FieldType
    default: Bound
    description: str
    task: Optional[str] = None
    capability: Optional[str] = None
    requires: tuple[str, ...] = ()

    def bind(self, settings: HandlerSettings, capabilities: ModelCapabilities) -> "FieldSpec":
        """This field with every Setting and Capability replaced by the loaded model's value."""
        return replace(self, type=_bind_type(self.type, settings, capabilities),
                       default=resolve(self.default, settings, capabilities))

    def applies_to(self, capabilities: ModelCapabilities) -> bool:
        if self.task is not None and self.task not in capabilities.tasks:
            return False
        return self.capability is None or getattr(capabilities, self.capability)


def _bind_type(field_type, settings: HandlerSettings, capabilities: ModelCapabilities):
    """A field type with its bounds resolved, and those of the item type it holds (OneOrMany)."""
    def bound(value):
        if isinstance(value, (Setting, Capability)) or not hasattr(value, "__dataclass_fields__"):
            return resolve(value, settings, capabilities)
        return _bind_type(value, settings, capabilities)

    return replace(field_type, **{name: bound(getattr(field_type, name)) for name in field_type.__dataclass_fields__})


SIDE = Integer(Setting("min_side"), Setting("max_side"), Capability("size_multiple"))
MAX_IP_ADAPTER_SCALE = 2.0
CONTROL = {"capability": "controlnets"}
FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("prompt", Text(Setting("max_prompt_length"), required=True), REQUIRED, "what to draw"),
    FieldSpec("negative_prompt", Text(Setting("max_prompt_length")), NONE,
              "what to steer away from (classifier-free guidance)", capability="negative_prompt"),
    FieldSpec("num_inference_steps", Integer(1, Setting("max_steps")), Setting("default_steps"),
              "denoising steps: more is slower and usually finer"),
    FieldSpec("guidance_scale", Number(0.0, Setting("max_guidance_scale")), Setting("default_guidance_scale"),
              "how closely to follow the prompt"),
    FieldSpec("width", SIDE, Setting("default_width"),
              "image width in pixels (image-to-image: the input's, rounded down to the size multiple)"),
    FieldSpec("height", SIDE, Setting("default_height"),
              "image height in pixels (image-to-image: the input's, rounded down to the size multiple)"),
    FieldSpec("seed", Integer(0, MAX_SEED), RANDOM, "seed of the first image; image i uses seed + i"),
    FieldSpec("num_images", Integer(1, Setting("max_images")), 1, "images to make from this prompt"),
    FieldSpec("scheduler", Choice(Capability("schedulers")), PIPELINE_SCHEDULER, "the sampler"),
    FieldSpec("output_format", Choice(OUTPUT_FORMATS), Setting("default_output_format"),
              "how the images come back (else the Accept header, else the setting; png when streaming)"),
    FieldSpec("stream", Boolean(), False,
              "answer with NDJSON progress events, then the result (also: Accept: application/x-ndjson)"),
    FieldSpec("preview_every", Integer(1, Setting("max_steps")), NONE,
              "with stream: every k-th progress event carries a small JPEG preview", requires=("stream",)),
    FieldSpec("timeout_seconds", Number(0.0, Setting("max_generation_seconds"), exclusive_minimum=True),
              Setting("max_generation_seconds"), "stop the generation when this much time has passed (504)"),
    FieldSpec("image", ImageInput("RGB", Setting("max_input_image_pixels")), NONE,
              "input image: switches to image-to-image", task=IMAGE_TO_IMAGE),
    FieldSpec("mask_image", ImageInput("L", Setting("max_input_image_pixels")), NONE,
              "mask, white = repaint: switches to inpainting", task=INPAINTING, requires=("image",)),
    FieldSpec("strength", Number(0.0, 1.0, exclusive_minimum=True), Setting("default_strength"),
              "how much to change the input image (1 ignores it)", task=IMAGE_TO_IMAGE, requires=("image",)),
    FieldSpec("loras", LoraList(Setting("max_loras"), Capability("loras")), NONE,
              "LoRA adapters applied together, each with its scale (0: none of its effect)", capability="loras"),
    FieldSpec("outpaint", Borders(Setting("max_side")), NONE,
              "extend the image's canvas by these pixels per side and paint the new border (inpainting); the "
              "canvas grows on the right and bottom to the size multiple", task=INPAINTING, requires=("image",)),
    FieldSpec("controlnet", OneOrMany(Choice(Capability("controlnets")), Setting("max_controlnets")), NONE,
              "the packaged ControlNet(s) that steer the image by a condition map", requires=("control_image",),
              **CONTROL),
    FieldSpec("control_image", OneOrMany(ImageInput("RGB", Setting("max_input_image_pixels")),
                                         Setting("max_controlnets")), NONE,
              "the condition map of each controlnet (resized to the output size)", requires=("controlnet",),
              **CONTROL),
    FieldSpec("controlnet_conditioning_scale", OneOrMany(Number(0.0, MAX_CONDITIONING_SCALE),
                                                         Setting("max_controlnets")), 1.0,
              "how strongly each controlnet steers (one number: all)", requires=("controlnet",), **CONTROL),
    FieldSpec("control_guidance_start", Number(0.0, 1.0), 0.0,
              "fraction of the steps after which the controlnets start steering", requires=("controlnet",),
              **CONTROL),
    FieldSpec("control_guidance_end", Number(0.0, 1.0), 1.0,
              "fraction of the steps after which they stop", requires=("controlnet",), **CONTROL),
    FieldSpec("control_preprocess", OneOrMany(Choice(PREPROCESSORS), Setting("max_controlnets")), NO_PREPROCESS,
              "per control_image: none (it is the condition map) or canny (edges found on the server, so a photo "
              "will do); one value: all", requires=("controlnet",), **CONTROL),
    FieldSpec("canny_low", Integer(0, CANNY_MAX_THRESHOLD), CANNY_LOW,
              "canny: gradients below it are never edges", requires=("controlnet", "control_preprocess"), **CONTROL),
    FieldSpec("canny_high", Integer(0, CANNY_MAX_THRESHOLD), CANNY_HIGH,
              "canny: gradients above it are always edges", requires=("controlnet", "control_preprocess"), **CONTROL),
    FieldSpec("ip_adapter", Choice(Capability("ip_adapters")), NONE,
              "the packed IP-Adapter whose image prompt steers the image (with every task)",
              requires=("ip_adapter_image",), capability="ip_adapters"),
    FieldSpec("ip_adapter_image", ImageInput("RGB", Setting("max_input_image_pixels")), NONE,
              "the image prompt of ip_adapter", requires=("ip_adapter",), capability="ip_adapters"),
    FieldSpec("ip_adapter_scale", Number(0.0, MAX_IP_ADAPTER_SCALE), 1.0,
              "how strongly the image prompt steers (0: not at all)", requires=("ip_adapter",),
              capability="ip_adapters"),
)
FIELD_NAMES = tuple(spec.name for spec in FIELDS)
# Rules over several fields, which a JSON Schema cannot state; each is a 400 naming the first field.
CROSS_FIELD_RULES = {  # formatted with the settings' values
    "width": "width x height <= {max_pixels}; an input image's own size must lie in {min_side} .. {max_side}",
    "num_images": "width x height x num_images <= {max_request_pixels}",
    "output_format": "png, jpeg and webp hold one image: num_images must be 1 (streams: any number); streams "
                     "carry png, jpeg or webp",
    "strength": "num_inference_steps x strength >= 1",
    "loras": "each LoRA at most once",
    "outpaint": "some side above 0; the outpainted canvas must fit the limits of width and height; not with "
                "width, height, mask_image or controlnet",
    "controlnet": "one control_image per controlnet, and one controlnet_conditioning_scale and control_preprocess "
                  "per controlnet or one for all; with text-to-image and image-to-image",
    "control_guidance_start": "control_guidance_start < control_guidance_end",
    "canny_low": "canny_low < canny_high",
}
# What a field whose ``capability`` the loaded pipeline lacks would need, for the refusal's message.
CAPABILITY_NEEDS = {"negative_prompt": "negative prompts",
                    "loras": "LoRA files (build_mar.sh --lora NAME=PATH, or the lora_dir setting)",
                    "controlnets": "ControlNets (packed with build_mar.sh --controlnet NAME=FOLDER)",
                    "ip_adapters": "IP-Adapters (packed with build_mar.sh --ip-adapter NAME=DIR)"}


# --- Typed requests -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImagePrompt:
    """An IP-Adapter's image prompt: which adapter, the decoded image, and how strongly it steers."""

    name: str
    image: Image.Image = field(compare=False)
    scale: float


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate for one client request, validated: the core trusts every value."""

    prompt: str
    negative_prompt: Optional[str]
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    seeds: tuple[int, ...]
    scheduler: Optional[str]  # None: the pipeline's own scheduler
    timeout_seconds: Optional[float] = None  # counted from when the worker received the request
    preview_every: int = 0  # 0: no previews
    image: Optional[Image.Image] = field(default=None, compare=False)
    mask_image: Optional[Image.Image] = field(default=None, compare=False)
    strength: Optional[float] = None
    loras: tuple[tuple[str, float], ...] = ()  # (name, scale) sorted by name; () for the base model
    control: Optional[ControlCondition] = None
    ip_adapter: Optional[ImagePrompt] = None
    prompt_translated: Optional[str] = None  # set by the translator (handler/model/translation.py)
    negative_prompt_translated: Optional[str] = None

    @property
    def model_prompt(self) -> str:
        """The prompt the model reads: the translation, where there is one."""
        return self.prompt if self.prompt_translated is None else self.prompt_translated

    @property
    def model_negative_prompt(self) -> Optional[str]:
        return self.negative_prompt if self.negative_prompt_translated is None else self.negative_prompt_translated

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def task(self) -> str:
        if self.mask_image is not None:
            return INPAINTING
        if self.image is not None:
            return IMAGE_TO_IMAGE
        return TEXT_TO_IMAGE

    @property
    def pixels(self) -> int:
        """The memory-relevant size: pixels of every image this request makes."""
        return self.width * self.height * self.num_images

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call (a deadline stops a call: only equal ones share)."""
        return (self.task, self.width, self.height, self.num_inference_steps, self.guidance_scale,
                self.scheduler, self.strength, self.negative_prompt is not None, self.timeout_seconds,
                self.loras, self.control.batch_key() if self.control is not None else None,
                (self.ip_adapter.name, self.ip_adapter.scale) if self.ip_adapter is not None else None)


@dataclass(frozen=True)
class ClientRequest:
    """A parsed body: what to generate, and how the door should return it (a format; a stream or not)."""

    generation: GenerationRequest
    output_format: str
    stream: bool = False


# --- The contract bound to one loaded model -------------------------------------------------------------------

class Contract:
    """The request contract of one loaded model: its fields with its limits, tasks and schedulers."""

    def __init__(self, settings: HandlerSettings, capabilities: ModelCapabilities = ModelCapabilities()):
        multiple = capabilities.size_multiple
        for name in ("default_width", "default_height", "min_side"):
            if getattr(settings, name) % multiple:
                raise SettingsError(f"model-config.yaml handler setting {name} must be a multiple of {multiple} "
                                    f"for {capabilities.pipeline_class}, got {getattr(settings, name)}")
        self.settings = settings
        self.capabilities = capabilities
        self.declared = {spec.name: spec.bind(settings, capabilities) for spec in FIELDS}
        self.fields = {name: spec for name, spec in self.declared.items() if spec.applies_to(capabilities)}

    # -- parsing --

    def parse(self, body: Mapping[str, Any], from_form: bool = False,
              preferred_format: Optional[str] = None) -> ClientRequest:
        """Validate one body's fields; raises Rejection for anything the client must fix.

        ``from_form``: every value is a string (or a file's bytes) and an empty value means "left out".
        ``preferred_format``: the door's choice (an Accept header) when the body names no output_format.
        """
        self._check_names(body)
        for name in self.fields:
            if name in body and body[name] is None:  # a proxy or client reading null as a value would disagree
                raise invalid(name, f"{name} is null; leave the field out to get its default "
                              f"({self.fields[name].default})")
        given = {name: body[name] for name in self.fields if is_given(body.get(name), from_form)}
        values = {name: self.fields[name].type.read(name, value, from_form) for name, value in given.items()}
        if "prompt" not in given:
            raise invalid("prompt", "prompt is required: a non-empty string", reason=MISSING_PROMPT)
        for name in given:
            for needed in self.fields[name].requires:
                if needed not in given or values[needed] is False:  # "stream": false asks for no stream either
                    raise invalid(name, f"{name} needs the field {needed}"
                                  + (" set to true" if isinstance(self.fields[needed].type, Boolean) else ""))

        def value(name):
            return values[name] if name in values else self.fields[name].default

        steps, num_images, stream = value("num_inference_steps"), value("num_images"), value("stream")
        default_format = STREAM_DEFAULT_FORMAT if stream else preferred_format or self.settings.default_output_format
        output_format = values.get("output_format", default_format)
        strength = value("strength") if "image" in given else None
        if strength is not None and int(steps * strength) < 1:
            raise invalid("strength", f"num_inference_steps x strength is {steps} x {strength} and must be at "
                          "least 1 (the image is denoised for that many steps); raise either")
        if stream and output_format not in SINGLE_IMAGE_FORMATS:
            raise invalid("output_format", f"a stream carries its images as png, jpeg or webp files; got "
                          f"output_format {output_format}")
        if output_format in SINGLE_IMAGE_FORMATS and num_images > 1 and not stream:
            raise invalid("output_format", f"output_format {output_format} holds one image but num_images is "
                          f"{num_images}; use json, npy or array for several images")
        self._check_outpaint(given)
        control_counts = self._check_control(values)
        explicit_size = "image" not in given or ("width" in values and "height" in values)
        if explicit_size:
            self._check_pixels(value("width"), value("height"), num_images)

        # Images last: decoding is the one expensive check.
        images = {name: self.fields[name].type.decode(name, values[name])
                  for name in ("image", "mask_image") if name in given}
        image, mask_image = images.get("image"), images.get("mask_image")
        if "outpaint" in values:
            image, mask_image = self._outpainted(image, values["outpaint"], num_images)
        width, height = value("width"), value("height")
        if image is not None:
            width, height = (values[name] if name in values else self._side_of(image, name)
                             for name in ("width", "height"))
            if not explicit_size:
                self._check_pixels(width, height, num_images)
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.LANCZOS)
            if mask_image is not None and mask_image.size != (width, height):
                mask_image = mask_image.resize((width, height), Image.Resampling.NEAREST)

        control = self._control(values, control_counts, width, height) if "controlnet" in values else None
        ip_adapter = ImagePrompt(values["ip_adapter"], self.fields["ip_adapter_image"].type.decode(
            "ip_adapter_image", values["ip_adapter_image"]), value("ip_adapter_scale")) if "ip_adapter" in values \
            else None
        seed = values.get("seed", secrets.randbelow(MAX_SEED + 1))
        generation = GenerationRequest(
            prompt=values["prompt"], negative_prompt=values.get("negative_prompt"), num_inference_steps=steps,
            guidance_scale=value("guidance_scale"), width=width, height=height,
            seeds=tuple((seed + offset) % (MAX_SEED + 1) for offset in range(num_images)),
            scheduler=values.get("scheduler"), timeout_seconds=value("timeout_seconds"),
            preview_every=values.get("preview_every", 0), image=image, mask_image=mask_image, strength=strength,
            loras=values.get("loras", ()),
            control=control, ip_adapter=ip_adapter,
        )
        return ClientRequest(generation, output_format, stream)

    def _check_names(self, body: Mapping[str, Any]) -> None:
        unknown = [name for name in body if name not in self.declared]
        if unknown:
            raise unknown_names(unknown, "field", f"; known fields: {list(self.fields)}")
        for name, spec in self.declared.items():
            if name not in self.fields and name in body:
                what = f"the {spec.task} task" if spec.task else CAPABILITY_NEEDS[spec.capability]
                offered = f"; it offers {list(self.capabilities.tasks)}" if spec.task else ""
                raise invalid(name, f"{name} is not supported by {self.capabilities.pipeline_class}: it needs "
                              f"{what}{offered}; leave the field out", reason=UNSUPPORTED_TASK)

    def _check_outpaint(self, given: Mapping[str, Any]) -> None:
        if "outpaint" not in given:
            return
        for name in ("width", "height", "mask_image", "controlnet"):
            if name in given:
                raise invalid("outpaint", f"outpaint sets the size and the mask and runs without ControlNets: "
                              f"leave {name} out")

    def _outpainted(self, image: Image.Image, margins: Margins, num_images: int) -> tuple[Image.Image, Image.Image]:
        """The canvas and border mask of an outpainting request, once its size is known to fit the limits."""
        settings = self.settings
        width, height = margins.canvas_size(image.width, image.height, self.capabilities.size_multiple)
        for side, name in ((width, "width"), (height, "height")):
            if not settings.min_side <= side <= settings.max_side:
                raise invalid("outpaint", f"the outpainted canvas is {width}x{height}: its {name} ({side}) is "
                              f"outside {settings.min_side} .. {settings.max_side}; change the borders or the image")
        if width * height > settings.max_pixels or width * height * num_images > settings.max_request_pixels:
            raise invalid("outpaint", f"the outpainted canvas is {width}x{height} = {width * height} pixels "
                          f"(x {num_images} images); at most {settings.max_pixels} pixels an image and "
                          f"{settings.max_request_pixels} a request are allowed")
        return extend_canvas(image, margins, self.capabilities.size_multiple)

    def _check_control(self, values: Mapping[str, Any]) -> dict[str, int]:
        """The cheap ControlNet rules; returns how many values each per-ControlNet field holds."""
        if "controlnet" not in values:
            return {}
        names = values["controlnet"]
        if "mask_image" in values:
            raise invalid("controlnet", f"controlnet works with text-to-image and image-to-image "
                          f"({list(self.capabilities.controlnet_tasks)}); leave mask_image out")
        if "image" in values and IMAGE_TO_IMAGE not in self.capabilities.controlnet_tasks:
            raise invalid("controlnet", f"controlnet works here with {list(self.capabilities.controlnet_tasks)} "
                          "only; leave image out")
        counts = {}
        for name in ("control_image", "controlnet_conditioning_scale", "control_preprocess"):
            count = len(values[name]) if name in values else 1
            allowed = (len(names),) if name == "control_image" else (1, len(names))
            if count not in allowed:
                raise invalid("controlnet", f"controlnet names {len(names)} ControlNet(s) {list(names)} but {name} "
                              f"holds {count} value(s); give " + " or ".join(map(str, sorted(set(allowed)))))
            counts[name] = count
        start, end = (values.get(name, self.fields[name].default)
                      for name in ("control_guidance_start", "control_guidance_end"))
        if start >= end:
            raise invalid("control_guidance_start", f"control_guidance_start ({start}) must be below "
                          f"control_guidance_end ({end})")
        low, high = (values.get(name, self.fields[name].default) for name in ("canny_low", "canny_high"))
        if low >= high:
            raise invalid("canny_low", f"canny_low ({low}) must be below canny_high ({high})")
        return counts

    def _control(self, values: Mapping[str, Any], counts: dict[str, int], width: int, height: int) -> ControlCondition:
        """The ControlNet condition: the control images decoded, sized to the output and preprocessed."""
        names = values["controlnet"]

        def per_controlnet(name):
            given = values.get(name, (self.fields[name].default,))
            return given * len(names) if len(given) == 1 else given

        low, high = (values.get(name, self.fields[name].default) for name in ("canny_low", "canny_high"))
        item = self.fields["control_image"].type.item
        images = []
        for encoded, preprocess in zip(values["control_image"], per_controlnet("control_preprocess")):
            control_image = item.decode("control_image", encoded)
            if control_image.size != (width, height):
                control_image = control_image.resize((width, height), Image.Resampling.LANCZOS)
            images.append(canny_edges(control_image, low, high) if preprocess == CANNY else control_image)
        return ControlCondition(names, tuple(images), per_controlnet("controlnet_conditioning_scale"),
                                values.get("control_guidance_start", self.fields["control_guidance_start"].default),
                                values.get("control_guidance_end", self.fields["control_guidance_end"].default))

    def _side_of(self, image: Image.Image, name: str) -> int:
        """An input image's side rounded down to the size multiple; must fit the side limits as it is."""
        multiple, settings = self.capabilities.size_multiple, self.settings
        side = (image.width if name == "width" else image.height) // multiple * multiple
        if not settings.min_side <= side <= settings.max_side:
            raise invalid("width", f"the input image's {name} ({side}) is outside {settings.min_side} .. "
                          f"{settings.max_side}; pass width and height to resize it")
        return side

    def _check_pixels(self, width: int, height: int, num_images: int) -> None:
        settings = self.settings
        if width * height > settings.max_pixels:
            raise invalid("width", f"width x height is {width}x{height} = {width * height} pixels; "
                          f"at most {settings.max_pixels} pixels are allowed")
        if width * height * num_images > settings.max_request_pixels:
            raise invalid("num_images", f"width x height x num_images is {width * height * num_images}; "
                          f"at most {settings.max_request_pixels} per request")

    # -- what the declaration tells a client --

    def json_schema(self) -> dict:
        """The JSON Schema (draft 2020-12) of a JSON body this model accepts."""
        properties = {}
        for name, spec in self.fields.items():
            schema = {**spec.type.schema(), "description": spec.description}
            if spec.default not in (REQUIRED, NONE, RANDOM, PIPELINE_SCHEDULER):
                schema["default"] = spec.default
            properties[name] = schema
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"Generation request for {self.capabilities.pipeline_class}",
            "description": "Also checked, with a 400 naming the field: " + "; ".join(
                self._cross_field_rule(name) for name in CROSS_FIELD_RULES),
            "type": "object",
            "properties": properties,
            "required": [name for name, spec in self.fields.items() if spec.default == REQUIRED],
            "additionalProperties": False,
            "dependentRequired": {name: list(spec.requires) for name, spec in self.fields.items() if spec.requires},
        }

    def _cross_field_rule(self, name: str) -> str:
        return CROSS_FIELD_RULES[name].format(**vars(self.settings))

    def field_table(self) -> list[tuple[str, str, str, str]]:
        """(field, default, allowed, meaning) per field: the docs' API table (scripts/gen_docs_tables.py)."""
        rows = []
        for name, spec in self.declared.items():
            allowed = spec.type.rule()
            if name in CROSS_FIELD_RULES:
                allowed += "; " + self._cross_field_rule(name)
            if spec.requires:
                allowed += "; needs " + ", ".join(spec.requires)
            rows.append((name, str(spec.default), allowed, spec.description))
        return rows


def is_given(value, from_form: bool) -> bool:
    """Whether a field was given: present, and in a form not empty (an empty form value means left out)."""
    if value is None:
        return False
    return not (from_form and isinstance(value, str) and value.strip() == "")


def json_text(name: str, text: str, expected: str):
    """A field given as JSON text (a form's outpaint or loras), parsed; a Rejection naming the field for bad
    syntax, and for nesting deeper than the parser's recursion allows (RecursionError, not a ValueError)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise invalid(name, f"{name} must be {expected}, got {shown(text)}") from None


def _form_number(name: str, text: str, kind: type):
    try:
        return kind(text.strip())
    except ValueError:
        raise invalid(name, f"{name} must be a number, got {shown(text)}") from None
