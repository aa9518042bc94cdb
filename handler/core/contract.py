"""The request contract: the core's fields declared once, and everything derived from that declaration.

The fields (``FIELDS``, typed by ``handler/core/fields.py``) say what shapes the image: prompt, size, steps, seed,
input images, adapters. How the images travel back (a format, a stream) is each protocol's business, declared by
the protocol with the same ``FieldSpec`` and read through ``Contract.read(..., extra=...)``. ``Contract`` binds
the declarations to one loaded model and derives from them

- ``read``: a body's fields -> typed values, or a ``Rejection`` naming the field, the value and the allowed range;
- ``check``: the rules over several fields (``RULES``), still before any image is decoded;
- ``prepare``: the images decoded and transformed (``handler/core/prepare.py``) -> a ``GenerationRequest``;
- ``json_schema`` and ``field_rows``: the JSON Schema of the bodies this model accepts, and the API table.

Nothing here knows HTTP or TorchServe: a protocol (``handler/protocols/``) turns its body into a mapping of fields.
"""

import secrets
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from handler.core import prepare
from handler.core.capabilities import IMAGE_TO_IMAGE, INPAINTING, ModelCapabilities
from handler.core.controlnets import (
    CANNY_HIGH, CANNY_LOW, CANNY_MAX_THRESHOLD, MAX_CONDITIONING_SCALE, NO_PREPROCESS, PREPROCESSORS,
)
from handler.core.failures import MISSING_PROMPT, UNSUPPORTED_TASK, invalid, unknown_names
from handler.core.fields import (
    NONE, PIPELINE_SCHEDULER, RANDOM, REQUIRED, Boolean, Borders, Capability, Choice, FieldSpec, ImageInput,
    Integer, LoraList, Number, OneOrMany, Setting, Text, is_given,
)
from handler.core.requests import MAX_SEED, GenerationRequest, ImagePrompt
from handler.core.settings import HandlerSettings, SettingsError

SIDE = Integer(Setting("min_side"), Setting("max_side"), Capability("size_multiple"))
CONTROL = {"capability": "controlnets"}
MAX_IP_ADAPTER_SCALE = 2.0
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
# What a field whose ``capability`` the loaded pipeline lacks would need, for the refusal's message.
CAPABILITY_NEEDS = {"negative_prompt": "negative prompts",
                    "loras": "LoRA files (build_mar.sh --lora NAME=PATH, or the lora_dir setting)",
                    "controlnets": "ControlNets (packed with build_mar.sh --controlnet NAME=FOLDER)",
                    "ip_adapters": "IP-Adapters (packed with build_mar.sh --ip-adapter NAME=DIR)"}


# --- Rules over several fields, which a JSON Schema cannot state ----------------------------------------------

@dataclass(frozen=True)
class Rule:
    """A rule over several fields: the field a refusal names, what the rule says (formatted with the settings;
    the schema's description and the API table show it) and the check that holds the request to it."""

    field: str
    says: str
    check: Optional[Callable[["Contract", dict], None]]  # None: held where noted in RULES


def below(field: str, other: str) -> Rule:
    """``field`` < ``other``: the words and the check from the one declaration."""
    def check(contract: "Contract", values: dict) -> None:
        if field in values or other in values:  # the defaults hold it
            low, high = contract.value(values, field), contract.value(values, other)
            if low >= high:
                raise invalid(field, f"{field} ({low}) must be below {other} ({high})")

    return Rule(field, f"{field} < {other}", check)


def _check_strength(contract: "Contract", values: dict) -> None:
    if "image" in values:
        steps, strength = contract.value(values, "num_inference_steps"), contract.value(values, "strength")
        if int(steps * strength) < 1:
            raise invalid("strength", f"num_inference_steps x strength is {steps} x {strength} and must be at "
                          "least 1 (the image is denoised for that many steps); raise either")


def _check_outpaint(contract: "Contract", values: dict) -> None:
    for name in ("width", "height", "mask_image", "controlnet"):
        if "outpaint" in values and name in values:
            raise invalid("outpaint", "outpaint sets the size and the mask and runs without ControlNets: "
                          f"leave {name} out")


def _check_control(contract: "Contract", values: dict) -> None:
    if "controlnet" not in values:
        return
    names, tasks = values["controlnet"], contract.capabilities.controlnet_tasks
    if "mask_image" in values:
        raise invalid("controlnet", f"controlnet works with text-to-image and image-to-image ({list(tasks)}); "
                      "leave mask_image out")
    if "image" in values and IMAGE_TO_IMAGE not in tasks:
        raise invalid("controlnet", f"controlnet works here with {list(tasks)} only; leave image out")
    for name in ("control_image", "controlnet_conditioning_scale", "control_preprocess"):
        count = len(values[name]) if name in values else 1
        allowed = (len(names),) if name == "control_image" else (1, len(names))
        if count not in allowed:
            raise invalid("controlnet", f"controlnet names {len(names)} ControlNet(s) {list(names)} but {name} "
                          f"holds {count} value(s); give " + " or ".join(map(str, sorted(set(allowed)))))


def _check_size(contract: "Contract", values: dict) -> None:
    """The pixel limits, where the size is known before decoding (else ``prepare`` checks them)."""
    if "image" not in values or ("width" in values and "height" in values):
        contract.check_pixels(contract.value(values, "width"), contract.value(values, "height"),
                              contract.value(values, "num_images"))


RULES: tuple[Rule, ...] = (  # checked in this order
    Rule("strength", "num_inference_steps x strength >= 1", _check_strength),
    Rule("outpaint", "some side above 0; the outpainted canvas must fit the limits of width and height; not with "
                     "width, height, mask_image or controlnet", _check_outpaint),
    Rule("controlnet", "one control_image per controlnet, and one controlnet_conditioning_scale and "
                       "control_preprocess per controlnet or one for all; with text-to-image and image-to-image",
         _check_control),
    below("control_guidance_start", "control_guidance_end"),
    below("canny_low", "canny_high"),
    Rule("width", "width x height <= {max_pixels}; an input image's own size must lie in {min_side} .. {max_side}",
         _check_size),
    Rule("num_images", "width x height x num_images <= {max_request_pixels}", None),  # with width's rule
    Rule("loras", "each LoRA at most once", None),  # as the list is read (fields.LoraList)
)


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
        self.declared = self.bind(FIELDS)
        self.fields = {name: spec for name, spec in self.declared.items() if spec.applies_to(capabilities)}

    def bind(self, specs: tuple[FieldSpec, ...]) -> dict[str, FieldSpec]:
        """Field declarations (the contract's, or a protocol's own) with this model's numbers, by name."""
        return {spec.name: spec.bind(self.settings, self.capabilities) for spec in specs}

    # -- reading --

    def parse(self, body: Mapping[str, Any], from_form: bool = False) -> GenerationRequest:
        """``read``, ``check`` and ``prepare`` one body; raises Rejection for anything the client must fix."""
        values = self.read(body, from_form)
        self.check(values)
        return self.prepare(values)

    def read(self, body: Mapping[str, Any], from_form: bool = False,
             extra: Mapping[str, FieldSpec] = {}) -> dict[str, Any]:
        """Each given field's typed value; raises Rejection for anything the client must fix.

        ``from_form``: every value is a string (or a file's bytes) and an empty value means "left out".
        ``extra``: a protocol's own fields (bound with ``bind``), read as the contract's are.
        """
        fields = {**self.fields, **extra}
        self._check_names(body, fields)
        for name in fields:
            if name in body and body[name] is None:  # a proxy or client reading null as a value would disagree
                raise invalid(name, f"{name} is null; leave the field out to get its default "
                              f"({fields[name].default})")
        given = {name: body[name] for name in fields if is_given(body.get(name), from_form)}
        values = {name: fields[name].type.read(name, value, from_form) for name, value in given.items()}
        if "prompt" not in given:
            raise invalid("prompt", "prompt is required: a non-empty string", reason=MISSING_PROMPT)
        for name in given:
            for needed in fields[name].requires:
                if needed not in given or values[needed] is False:  # "stream": false asks for no stream either
                    raise invalid(name, f"{name} needs the field {needed}"
                                  + (" set to true" if isinstance(fields[needed].type, Boolean) else ""))
        return values

    def value(self, values: Mapping[str, Any], name: str):
        """A field's value as given, else its default."""
        return values[name] if name in values else self.fields[name].default

    def check(self, values: Mapping[str, Any], extra: tuple[Rule, ...] = ()) -> None:
        """The rules over several fields (``RULES``, then a protocol's own): cheap, so every one runs before an
        image is decoded."""
        for rule in (*RULES, *extra):
            if rule.check is not None:
                rule.check(self, values)

    def prepare(self, values: Mapping[str, Any]) -> GenerationRequest:
        """The typed request, with its input images decoded, outpainted, sized and preprocessed: images last,
        since decoding is the one expensive step."""
        num_images = self.value(values, "num_images")
        image, mask_image = prepare.input_images(self.fields, values)
        if "outpaint" in values:
            image, mask_image = prepare.outpainted(image, values["outpaint"], num_images, self.settings,
                                                   self.capabilities.size_multiple)
        width, height = self.value(values, "width"), self.value(values, "height")
        if image is not None:
            width, height = (values[name] if name in values else
                             prepare.side_of(image, name, self.settings, self.capabilities.size_multiple)
                             for name in ("width", "height"))
            if "width" not in values or "height" not in values:
                self.check_pixels(width, height, num_images)
            image, mask_image = prepare.sized(image, mask_image, width, height)
        seed = values.get("seed", secrets.randbelow(MAX_SEED + 1))
        return GenerationRequest(
            prompt=values["prompt"], negative_prompt=values.get("negative_prompt"),
            num_inference_steps=self.value(values, "num_inference_steps"),
            guidance_scale=self.value(values, "guidance_scale"), width=width, height=height,
            seeds=tuple((seed + offset) % (MAX_SEED + 1) for offset in range(num_images)),
            scheduler=values.get("scheduler"), timeout_seconds=self.value(values, "timeout_seconds"),
            image=image, mask_image=mask_image, strength=self.value(values, "strength") if "image" in values else None,
            loras=values.get("loras", ()),
            control=prepare.control_condition(self.fields, values, width, height) if "controlnet" in values else None,
            ip_adapter=ImagePrompt(values["ip_adapter"], self.fields["ip_adapter_image"].type.decode(
                "ip_adapter_image", values["ip_adapter_image"]), self.value(values, "ip_adapter_scale"))
            if "ip_adapter" in values else None,
        )

    def _check_names(self, body: Mapping[str, Any], fields: Mapping[str, FieldSpec]) -> None:
        unknown = [name for name in body if name not in self.declared and name not in fields]
        if unknown:
            raise unknown_names(unknown, "field", f"; known fields: {list(fields)}")
        for name, spec in self.declared.items():
            if name not in self.fields and name in body:
                what = f"the {spec.task} task" if spec.task else CAPABILITY_NEEDS[spec.capability]
                offered = f"; it offers {list(self.capabilities.tasks)}" if spec.task else ""
                raise invalid(name, f"{name} is not supported by {self.capabilities.pipeline_class}: it needs "
                              f"{what}{offered}; leave the field out", reason=UNSUPPORTED_TASK)

    def check_pixels(self, width: int, height: int, num_images: int) -> None:
        settings = self.settings
        if width * height > settings.max_pixels:
            raise invalid("width", f"width x height is {width}x{height} = {width * height} pixels; "
                          f"at most {settings.max_pixels} pixels are allowed")
        if width * height * num_images > settings.max_request_pixels:
            raise invalid("num_images", f"width x height x num_images is {width * height * num_images}; "
                          f"at most {settings.max_request_pixels} per request")

    # -- what the declaration tells a client --

    def rules(self, extra: tuple[Rule, ...] = ()) -> dict[str, str]:
        """What each rule over several fields says, with this model's numbers, by the field it names."""
        return {rule.field: rule.says.format(**vars(self.settings)) for rule in (*RULES, *extra)}

    def json_schema(self, extra: Mapping[str, FieldSpec] = {}, extra_rules: tuple[Rule, ...] = ()) -> dict:
        """The JSON Schema (draft 2020-12) of a JSON body this model accepts (with a protocol's own fields)."""
        fields = {**self.fields, **extra}
        properties = {}
        for name, spec in fields.items():
            schema = {**spec.type.schema(), "description": spec.description}
            if spec.default not in (REQUIRED, NONE, RANDOM, PIPELINE_SCHEDULER):
                schema["default"] = spec.default
            properties[name] = schema
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"Generation request for {self.capabilities.pipeline_class}",
            "description": "Also checked, with a 400 naming the field: " + "; ".join(
                self.rules(extra_rules).values()),
            "type": "object",
            "properties": properties,
            "required": [name for name, spec in fields.items() if spec.default == REQUIRED],
            "additionalProperties": False,
            "dependentRequired": {name: list(spec.requires) for name, spec in fields.items() if spec.requires},
        }

    def field_rows(self, extra: Mapping[str, FieldSpec] = {}, extra_rules: tuple[Rule, ...] = ()) \
            -> list[tuple[str, str, str, str]]:
        """(field, default, allowed, meaning) per declared field: the rows of the docs' API table."""
        rules, rows = self.rules(extra_rules), []
        for name, spec in {**self.declared, **extra}.items():
            allowed = spec.type.rule()
            if name in rules:
                allowed += "; " + rules[name]
            if spec.requires:
                allowed += "; needs " + ", ".join(spec.requires)
            rows.append((name, str(spec.default), allowed, spec.description))
        return rows
