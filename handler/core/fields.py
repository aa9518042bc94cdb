"""Field types and field declarations: how one request field is read, described and put in a JSON Schema.

A ``FieldSpec`` says a field's type, default, range or choices, the tasks or capabilities it needs, and what it
means. A bound may be a number or come from the model (``Setting``: model-config.yaml ``handler:``;
``Capability``: the loaded pipeline), resolved by ``FieldSpec.bind`` once the model is loaded. The contract
(``handler/core/contract.py``) declares the core's fields with these; a protocol may declare its own the same way.
"""

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

from PIL import Image

from handler.core.capabilities import ModelCapabilities
from handler.core.failures import MISSING_PROMPT, Rejection, invalid, shown
from handler.core.images import decode_image
from handler.core.outpaint import SIDES, Margins
from handler.core.settings import HandlerSettings

LORA_SCALE_MIN, LORA_SCALE_MAX, LORA_SCALE_DEFAULT = -2.0, 2.0, 1.0  # negative scales steer away ("sliders")


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
