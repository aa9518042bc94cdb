"""AUTOMATIC1111's web UI API: ``/predictions/{model}/{version}/sdapi/v1/...``.

Open WebUI's and SillyTavern's image generation, the ``webuiapi`` Python client and many chat bots speak this
API. TorchServe hands the path below the model's version to the handler in the ``url_path`` header
(``sdapi/v1/txt2img``) but not the HTTP method, so a route that has both a GET and a POST in A1111 (``options``)
tells them apart by the body: none is a GET.

``txt2img`` and ``img2img`` translate A1111's fields into the contract's and let ``Contract.parse`` judge them
(every range and message comes from the contract; a failure names the field the client sent). Every A1111
field is declared once in ``A1111_FIELDS`` with what this server does with it: mapped to a contract field, or
accepted at the values clients send by habit (A1111's defaults) and refused otherwise; any other field is
refused. The docs' field table is generated from that declaration (scripts/gen_docs_tables.py).
``<lora:NAME:WEIGHT>`` in the prompt selects the model's packed LoRAs, as A1111's extra networks do. Answers: A1111's ``{"images", "parameters", "info"}``
(``info`` a JSON string with seeds and infotexts) and its error shape ``{"error", "detail", "body", "errors"}``.
"""

import base64
import io
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from PIL import ImageFilter, ImageOps

from handler.core.contract import Contract
from handler.core.requests import GenerationRequest
from handler.core.encoding import image_file
from handler.core.failures import (
    INVALID_BODY, NOT_IMPLEMENTED, UNKNOWN_FIELD, Rejection, invalid, shown,
)
from handler.core.images import decode_image
from handler.core.infotext import infotext
from handler.core.schedulers import (
    A1111_DEFAULT_SCHEDULE, A1111_SCHEDULES, AUTOMATIC, SCHEDULERS, a1111_sampler_label, a1111_samplers,
    from_a1111,
)
from handler.protocols.http import (
    Call, HttpRequest, Protocol, Reply, RouteRejection, ServedModel, failure_of, result_headers, status_of,
)

PREFIX = "sdapi/v1"
TXT2IMG, IMG2IMG = "txt2img", "img2img"
IMAGE_ROUTES = (TXT2IMG, IMG2IMG)
LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?(?::[^<>]*)?>")
MODEL_SUFFIXES = (".safetensors", ".ckpt")
MAX_UNKNOWN_SHOWN = 5


# --- Every A1111 field and what this server does with it ----------------------------------------------------

MAPPED, HABIT = "mapped", "accepted at its default"


@dataclass(frozen=True)
class A1111Field:
    """One field of A1111's txt2img/img2img body.

    ``handling``: MAPPED (to ``target``, a contract field) or HABIT (accepted while it holds one of
    ``accepted``, the values clients send by habit, refused otherwise; ``accepted=None``: any value, which has
    no effect here). Any other field is refused. ``note``: the docs' explanation.
    """

    name: str
    routes: tuple[str, ...]
    handling: str
    note: str
    target: Optional[str] = None
    accepted: tuple = ()


BOTH = IMAGE_ROUTES
NONE_OR = (None, "")
A1111_FIELDS: tuple[A1111Field, ...] = (
    A1111Field("prompt", BOTH, MAPPED, "`prompt`; `<lora:NAME:WEIGHT>` tags select the model's LoRAs (`loras`)",
               "prompt"),
    A1111Field("negative_prompt", BOTH, MAPPED, "`negative_prompt` (empty: none)", "negative_prompt"),
    A1111Field("steps", BOTH, MAPPED, "`num_inference_steps` (A1111's default 50)", "num_inference_steps"),
    A1111Field("cfg_scale", BOTH, MAPPED, "`guidance_scale` (A1111's default 7.0)", "guidance_scale"),
    A1111Field("width", BOTH, MAPPED, "`width` (A1111's default 512)", "width"),
    A1111Field("height", BOTH, MAPPED, "`height` (A1111's default 512)", "height"),
    A1111Field("seed", BOTH, MAPPED, "`seed`; -1 (the default) draws one", "seed"),
    A1111Field("batch_size", BOTH, MAPPED, "`num_images` = batch_size x n_iter; image i gets seed + i, as in "
                                           "A1111", "num_images"),
    A1111Field("n_iter", BOTH, MAPPED, "see batch_size", "num_images"),
    A1111Field("sampler_name", BOTH, MAPPED, "`scheduler`, by A1111's name or alias (`Euler a`, `DPM++ 2M`, "
                                             "`DPM++ 2M Karras`, `k_euler_a`...); left out: the model's own",
               "scheduler"),
    A1111Field("sampler_index", BOTH, MAPPED, "as sampler_name (A1111's older field)", "scheduler"),
    A1111Field("scheduler", BOTH, MAPPED, "with sampler_name: `Automatic`, `Karras` or `Uniform` where the "
                                          "sampler has it (GET schedulers)", "scheduler"),
    A1111Field("init_images", (IMG2IMG,), MAPPED, "`image`: one base64 image (a data: URL works too); "
                                                  "URLs are refused", "image"),
    A1111Field("mask", (IMG2IMG,), MAPPED, "`mask_image` (white = repaint): switches to inpainting",
               "mask_image"),
    A1111Field("denoising_strength", BOTH, MAPPED, "img2img: `strength` (A1111's default 0.75); txt2img: "
                                                   "ignored unless enable_hr, as in A1111", "strength"),
    A1111Field("mask_blur", (IMG2IMG,), MAPPED, "Gaussian blur radius applied to the mask (A1111's default 4)"),
    A1111Field("mask_blur_x", (IMG2IMG,), HABIT, "only 4 (A1111's default; use mask_blur)", accepted=(4,)),
    A1111Field("mask_blur_y", (IMG2IMG,), HABIT, "only 4 (A1111's default; use mask_blur)", accepted=(4,)),
    A1111Field("inpainting_mask_invert", (IMG2IMG,), MAPPED, "1 repaints the black part of the mask instead",
               accepted=(0, 1)),
    A1111Field("inpainting_fill", (IMG2IMG,), HABIT, "0 (fill, A1111's default) and 1 (original) both start "
                                                     "from the input's pixels; 2 and 3 refused", accepted=(0, 1)),
    A1111Field("inpaint_full_res", (IMG2IMG,), HABIT, "the whole picture is repainted (A1111's False/0); True "
                                                      "accepted as clients send it, repainting the whole picture",
               accepted=(False, True, 0, 1)),
    A1111Field("inpaint_full_res_padding", (IMG2IMG,), HABIT, "any: has no effect when the whole picture is "
                                                              "repainted", accepted=None),
    A1111Field("resize_mode", (IMG2IMG,), HABIT, "only 0 (just resize, the default)", accepted=(0,)),
    A1111Field("include_init_images", (IMG2IMG,), HABIT, "only false (the default)", accepted=(False,)),
    A1111Field("image_cfg_scale", (IMG2IMG,), HABIT, "any: A1111 reads it for instruct-pix2pix models only",
               accepted=None),
    A1111Field("initial_noise_multiplier", (IMG2IMG,), HABIT, "only null or 1", accepted=(None, 1, 1.0)),
    A1111Field("override_settings", BOTH, MAPPED, "`sd_model_checkpoint` must name this model (the gateway "
                                                  "routes by it); `CLIP_stop_at_last_layers` 1 and `sd_vae` "
                                                  "Automatic/None accepted; other settings refused"),
    A1111Field("override_settings_restore_afterwards", BOTH, HABIT, "any (nothing persists between requests)",
               accepted=None),
    A1111Field("send_images", BOTH, MAPPED, "false answers without images, as in A1111", accepted=(True, False)),
    A1111Field("save_images", BOTH, HABIT, "any: this server stores no files", accepted=None),
    A1111Field("do_not_save_samples", BOTH, HABIT, "any: this server stores no files", accepted=None),
    A1111Field("do_not_save_grid", BOTH, HABIT, "any: this server stores no files", accepted=None),
    A1111Field("restore_faces", BOTH, HABIT, "only false/null", accepted=(False, None)),
    A1111Field("tiling", BOTH, HABIT, "only false/null", accepted=(False, None)),
    A1111Field("enable_hr", (TXT2IMG,), HABIT, "only false (hires fix is not offered; the hr_* fields are "
                                               "then ignored, as in A1111)", accepted=(False, None)),
    A1111Field("subseed", BOTH, HABIT, "only -1 (variation seeds are not offered)", accepted=(-1, None)),
    A1111Field("subseed_strength", BOTH, HABIT, "only 0", accepted=(0, 0.0, None)),
    A1111Field("seed_resize_from_h", BOTH, HABIT, "only -1 or 0", accepted=(-1, 0, None)),
    A1111Field("seed_resize_from_w", BOTH, HABIT, "only -1 or 0", accepted=(-1, 0, None)),
    A1111Field("styles", BOTH, HABIT, "only an empty list", accepted=((), [], None)),
    A1111Field("eta", BOTH, HABIT, "only null or 1 (the samplers' own noise)", accepted=(None, 1, 1.0)),
    A1111Field("s_min_uncond", BOTH, HABIT, "only null or 0", accepted=(None, 0, 0.0)),
    A1111Field("s_churn", BOTH, HABIT, "only null or 0", accepted=(None, 0, 0.0)),
    A1111Field("s_tmax", BOTH, HABIT, "only null or 0", accepted=(None, 0, 0.0)),
    A1111Field("s_tmin", BOTH, HABIT, "only null or 0", accepted=(None, 0, 0.0)),
    A1111Field("s_noise", BOTH, HABIT, "only null or 1", accepted=(None, 1, 1.0)),
    A1111Field("script_name", BOTH, HABIT, "only null or empty (scripts are not offered)", accepted=NONE_OR),
    A1111Field("script_args", BOTH, HABIT, "only an empty list", accepted=((), [], None)),
    A1111Field("alwayson_scripts", BOTH, HABIT, "only an empty object", accepted=({}, None)),
    A1111Field("refiner_checkpoint", BOTH, HABIT, "only null or empty", accepted=NONE_OR),
    A1111Field("refiner_switch_at", BOTH, HABIT, "only null or 0", accepted=(None, 0, 0.0)),
    A1111Field("disable_extra_networks", BOTH, HABIT, "only false", accepted=(False, None)),
    A1111Field("comments", BOTH, HABIT, "any (not stored)", accepted=None),
    A1111Field("infotext", BOTH, HABIT, "only null or empty", accepted=NONE_OR),
    A1111Field("force_task_id", BOTH, HABIT, "any (progress is not tracked per task)", accepted=None),
    A1111Field("firstphase_width", (TXT2IMG,), HABIT, "only 0", accepted=(0, None)),
    A1111Field("firstphase_height", (TXT2IMG,), HABIT, "only 0", accepted=(0, None)),
    # Not A1111 fields: SillyTavern sends its connection settings and SD.Next's clip_skip along.
    A1111Field("url", BOTH, HABIT, "any: SillyTavern's own setting, sent along (ignored)", accepted=None),
    A1111Field("auth", BOTH, HABIT, "any: SillyTavern's own setting, sent along (ignored, never echoed)",
               accepted=None),
    A1111Field("clip_skip", BOTH, HABIT, "only 1 (SD.Next's field; SillyTavern sends it)", accepted=(1, None)),
)
# The hires-fix fields: A1111 reads them only with enable_hr, so clients send their own defaults freely.
HIRES_FIELDS = ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
                "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_cfg",
                "hr_distilled_cfg")
FIELD_OF = {spec.name: spec for spec in A1111_FIELDS}
# override_settings that may be given at the value this server has (anything else is refused).
FIXED_SETTINGS = {"CLIP_stop_at_last_layers": (1,), "sd_vae": ("Automatic", "None", None)}
# A1111's defaults where they differ from this model's (A1111 uses the same ones whatever the checkpoint).
A1111_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 7.0, "width": 512, "height": 512}
A1111_DEFAULT_STRENGTH = 0.75
A1111_DEFAULT_MASK_BLUR = 4
SENT_BACK = {"prompt": "", "negative_prompt": "", "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512,
             "seed": -1, "batch_size": 1, "n_iter": 1, "sampler_name": None, "scheduler": None,
             "override_settings": {}}


# --- What the handler carries through a batch ------------------------------------------------------------------

@dataclass(kw_only=True)
class A1111Call(Call):
    """One request of this API: what to generate and how to answer, or a ready answer (``reply``)."""

    route: str = ""
    request: Optional[GenerationRequest] = None
    reply: Any = None  # a ready JSON answer (the GET routes, POST options)
    echo: dict = field(default_factory=dict)  # A1111's "parameters": the request as read, with its defaults
    send_images: bool = True
    params: dict[str, str] = field(default_factory=dict)  # contract field -> the A1111 field the client used

    def requests(self) -> list[GenerationRequest]:
        return [self.request] if self.request is not None else []


def route_of(request: HttpRequest) -> Optional[str]:
    """The A1111 route of a request (``txt2img``), or None when it is not under ``sdapi/v1``."""
    return request.route[len(PREFIX):].strip("/") if request.is_under(PREFIX) else None


# --- The protocol -------------------------------------------------------------------------------------------

class A1111Protocol(Protocol):
    """A1111's API for one loaded model."""

    call_type = A1111Call

    def __init__(self, contract: Contract, model: ServedModel):
        super().__init__(contract, model)
        self.get_routes = {
            "sd-models": self._sd_models, "samplers": self._samplers, "schedulers": self._schedulers,
            "options": self._options, "loras": self._loras, "embeddings": self._embeddings,
            "progress": _idle_progress, "sd-vae": lambda: [], "upscalers": _upscalers,
            "latent-upscale-modes": lambda: [], "cmd-flags": lambda: {}, "prompt-styles": lambda: [],
            "scripts": lambda: {"txt2img": [], "img2img": []},
        }

    def read(self, request: HttpRequest) -> A1111Call:
        """One request of this API -> an A1111Call; raises Rejection (its field an A1111 name)."""
        route = route_of(request) or ""
        request.refuse_explanations("POST to /predictions/{model}/{version}/sdapi/v1/txt2img instead")
        if route in IMAGE_ROUTES:
            return self._generation(route, _json_body(request))
        if route == "options" and _has_body(request.row):
            return A1111Call(route=route, reply=self._set_options(_json_body(request)))
        if route in self.get_routes:
            return A1111Call(route=route, reply=self.get_routes[route]())
        raise RouteRejection(NOT_IMPLEMENTED, f"no route {shown('/' + PREFIX + '/' + route)} here; this server "
                             f"offers POST {PREFIX}/txt2img, POST {PREFIX}/img2img, POST {PREFIX}/options and GET "
                             f"{PREFIX}/" + f", GET {PREFIX}/".join(self.get_routes))

    # -- txt2img, img2img --

    def _generation(self, route: str, body: Mapping[str, Any]) -> A1111Call:
        self._check_fields(route, body)
        fields, params = {}, {}

        def mapped(a1111_name: str, target: str, value) -> None:
            fields[target], params[target] = value, a1111_name

        prompt, loras = _lora_tags(body.get("prompt", ""))
        mapped("prompt", "prompt", prompt)
        if loras:
            mapped("prompt", "loras", loras)
        if body.get("negative_prompt"):
            mapped("negative_prompt", "negative_prompt", body["negative_prompt"])
        for a1111_name, target in (("steps", "num_inference_steps"), ("cfg_scale", "guidance_scale"),
                                   ("width", "width"), ("height", "height")):
            mapped(a1111_name, target, body.get(a1111_name, A1111_DEFAULTS[target]))
        seed = body.get("seed", -1)
        if seed is not None and seed != -1:
            mapped("seed", "seed", seed)
        batch_size, n_iter = body.get("batch_size", 1), body.get("n_iter", 1)
        for name, value in (("batch_size", batch_size), ("n_iter", n_iter)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise invalid(name, f"{name} must be a whole number of at least 1, got {shown(value)}")
        mapped("batch_size", "num_images", batch_size * n_iter)
        scheduler = self._scheduler(body)
        if scheduler is not None:
            mapped("sampler_name", "scheduler", scheduler)
        self._check_model(body.get("override_settings"))
        if route == IMG2IMG:
            self._image_fields(body, mapped)
        try:
            request = self.contract.parse(fields)
        except Rejection as rejection:
            raise a1111_rejection(rejection, params, body) from None
        echo = {**SENT_BACK, **{key: value for key, value in body.items()
                                if key not in ("url", "auth", "init_images", "mask")}}
        return A1111Call(route=route, request=request, echo=echo,
                         send_images=body.get("send_images", True) is not False, params=params)

    def _check_fields(self, route: str, body: Mapping[str, Any]) -> None:
        """Unknown fields are refused with the list of known ones; habit fields only at their habit values."""
        unknown = [key for key in body if (key not in FIELD_OF or route not in FIELD_OF[key].routes)
                   and not (route == TXT2IMG and key in HIRES_FIELDS)]
        if unknown:
            listed = ", ".join(shown(key) for key in unknown[:MAX_UNKNOWN_SHOWN])
            more = f" and {len(unknown) - MAX_UNKNOWN_SHOWN} more" if len(unknown) > MAX_UNKNOWN_SHOWN else ""
            known = [spec.name for spec in A1111_FIELDS if route in spec.routes]
            raise invalid(unknown[0][:80], f"unknown or unsupported field(s) {listed}{more} for /{PREFIX}/{route}; "
                          f"the fields read here are {known}", reason=UNKNOWN_FIELD)
        for key, value in body.items():
            spec = FIELD_OF.get(key)
            if spec is None or spec.accepted is None:
                continue
            if spec.accepted and not any(_same(value, allowed) for allowed in spec.accepted):
                raise invalid(key, f"{key} {shown(value)} is not offered by this server: {spec.note}")

    def _scheduler(self, body: Mapping[str, Any]) -> Optional[str]:
        """A1111's sampler_name (or sampler_index) and scheduler -> this model's scheduler; None: its own."""
        sampler = body.get("sampler_name") or body.get("sampler_index")
        schedule = body.get("scheduler")
        if sampler is None and schedule in (None, "", AUTOMATIC, "automatic"):
            return None
        name = "sampler_name" if body.get("sampler_name") else "sampler_index"
        if sampler is None:
            raise invalid("scheduler", f"scheduler {shown(schedule)} needs a sampler_name (GET {PREFIX}/samplers)")
        if not isinstance(sampler, str) or not isinstance(schedule, (str, type(None))):
            raise invalid(name, f"{name} and scheduler must be strings, got {shown(sampler)} and {shown(schedule)}")
        available = self.contract.capabilities.schedulers
        chosen = from_a1111(sampler, schedule, available)
        if chosen is None:
            combinations = [a1111_sampler_label(choice) for choice in available]
            raise invalid(name, f"{name} {shown(sampler)} with scheduler {shown(schedule)} is not offered by this "
                          f"model; it runs {combinations} (GET {PREFIX}/samplers and {PREFIX}/schedulers)")
        return chosen

    def _check_model(self, settings) -> None:
        if settings is None:
            return
        if not isinstance(settings, dict):
            raise invalid("override_settings", f"override_settings must be an object, got {shown(settings)}")
        for key, value in settings.items():
            if key == "sd_model_checkpoint":
                self._check_checkpoint("override_settings.sd_model_checkpoint", value)
            elif key not in FIXED_SETTINGS or not any(_same(value, allowed) for allowed in FIXED_SETTINGS[key]):
                raise invalid(f"override_settings.{key}"[:80], f"override_settings.{key} {shown(value)} is not "
                              f"offered; this server takes sd_model_checkpoint and, at their values, "
                              f"{ {name: allowed[0] for name, allowed in FIXED_SETTINGS.items()} }")

    def _check_checkpoint(self, name: str, value) -> None:
        """A checkpoint name (A1111 accepts its title, with or without the file suffix) must be this model."""
        chosen = value.strip() if isinstance(value, str) else value
        for suffix in MODEL_SUFFIXES:
            if isinstance(chosen, str) and chosen.endswith(suffix):
                chosen = chosen[:-len(suffix)]
        if chosen not in (None, "", self.model.name):
            raise RouteRejection(NOT_IMPLEMENTED, f"model {shown(value)} not found: this address serves "
                                 f"[{self.model.name!r}]; a gateway in front of several models routes by it",
                                 field=name)

    def _image_fields(self, body: Mapping[str, Any], mapped) -> None:
        images = body.get("init_images")
        if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str):
            raise invalid("init_images", "init_images must be a list of one base64 image (PNG, JPEG or WebP), got "
                          f"{shown(images)}")
        mapped("init_images", "image", _base64_of(images[0]))
        mapped("denoising_strength", "strength", body.get("denoising_strength", A1111_DEFAULT_STRENGTH))
        mask = body.get("mask")
        if mask:
            mapped("mask", "mask_image", self._mask(mask, body))

    def _mask(self, value, body: Mapping[str, Any]) -> str:
        """A1111's mask (white = repaint), inverted and blurred as A1111 does, as the contract reads it."""
        spec = self.contract.fields.get("mask_image")
        if spec is None or not isinstance(value, str):  # no inpainting here: the contract says so for mask_image
            return value
        radius = body.get("mask_blur", A1111_DEFAULT_MASK_BLUR)
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not 0 <= radius <= 64:
            raise invalid("mask_blur", f"mask_blur must be a number of pixels from 0 to 64, got {shown(radius)}")
        mask = decode_image("mask", _base64_of(value), spec.type.max_pixels, "L")
        if body.get("inpainting_mask_invert", 0) == 1:
            mask = ImageOps.invert(mask)
        if radius:
            mask = mask.filter(ImageFilter.GaussianBlur(radius))
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG", compress_level=1)
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    # -- the GET routes and options --

    def _sd_models(self) -> list:
        return [model_entry(self.model.name)]

    def _samplers(self) -> list:
        return samplers_of(self.contract.capabilities.schedulers)

    def _schedulers(self) -> list:
        return schedulers_of(self.contract.capabilities.schedulers)

    def _options(self) -> dict:
        return options_of(self.model.name)

    def _embeddings(self) -> dict:
        """The model's packed textual-inversion words, which a prompt uses by name (as in A1111)."""
        return {"loaded": {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                                  "vectors": None} for name in self.contract.capabilities.embeddings},
                "skipped": {}}

    def _loras(self) -> list:
        return [{"name": name, "alias": name, "path": f"loras/{name}.safetensors", "metadata": {}}
                for name in self.contract.capabilities.loras]

    def _set_options(self, body: Mapping[str, Any]):
        """POST options: ``sd_model_checkpoint`` may name this model; every other option may only be sent back
        at the value GET options gives (Open WebUI posts the whole dict back)."""
        current = self._options()
        for key, value in body.items():
            if key == "sd_model_checkpoint":
                self._check_checkpoint(key, value)
            elif key not in current or not _same(value, current[key]):
                raise invalid(key[:80], f"option {shown(key)} cannot be changed on this server (it has "
                              f"{shown(current.get(key))}); POST options takes sd_model_checkpoint")
        return None

    # -- answers --

    def respond(self, call: A1111Call, outcomes: list) -> Reply:
        """The answer to one call from the engine's outcomes (none, or one GenerationResult or Rejection)."""
        failure = failure_of(call, outcomes)
        if failure is not None:
            field_name = call.params.get(failure.field, failure.field)
            return error_reply(failure if field_name == failure.field else
                               Rejection(failure.reason, failure.message, field_name))
        if call.request is None:
            return Reply(200, json.dumps(call.reply).encode())
        (outcome,) = outcomes
        generation, parameters = outcome.request, outcome.parameters()
        seeds = list(generation.seeds)
        images = [base64.b64encode(image_file(image, "png", parameters, seed)).decode("ascii")
                  for image, seed in zip(outcome.images, seeds)] if call.send_images else []
        info = info_of(parameters, seeds, self.model.name, call.echo)
        document = {"images": images, "parameters": {**call.echo, "seed": seeds[0]}, "info": json.dumps(info)}
        return Reply(200, json.dumps(document).encode(), result_headers(seeds, outcome.nsfw))


# --- Documents ------------------------------------------------------------------------------------------------

def model_entry(name: str) -> dict:
    """One entry of GET sd-models: the model's name is its title (what sd_model_checkpoint names)."""
    return {"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}


def options_of(model_name: str) -> dict:
    """GET options: the model, and the settings this server has fixed values for."""
    return {"sd_model_checkpoint": model_name, "sd_checkpoint_hash": None, "samples_format": "png",
            **{name: allowed[0] for name, allowed in FIXED_SETTINGS.items()}}


def samplers_of(available: tuple[str, ...]) -> list:
    return [{"name": name, "aliases": list(aliases), "options": {}}
            for name, aliases in a1111_samplers(available).items()]


def schedulers_of(available: tuple[str, ...]) -> list:
    """The schedule types the model's samplers take (Automatic: each sampler's own)."""
    used = {AUTOMATIC} | {SCHEDULERS[name].a1111[1] for name in available}
    used |= {A1111_DEFAULT_SCHEDULE[sampler] for sampler in a1111_samplers(available)
             if sampler in A1111_DEFAULT_SCHEDULE}
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1.0, "need_inner_model": False}
            for label, name in A1111_SCHEDULES.items() if label in used]


def info_of(parameters: Mapping[str, Any], seeds: list[int], model_name: str, echo: Mapping[str, Any]) -> dict:
    """A1111's ``info`` (a JSON string in the answer): the seeds, sizes, sampler and each image's infotext."""
    count = len(seeds)
    prompt, negative = parameters["prompt"], parameters.get("negative_prompt") or ""
    return {
        "prompt": prompt, "all_prompts": [prompt] * count, "negative_prompt": negative,
        "all_negative_prompts": [negative] * count, "seed": seeds[0], "all_seeds": seeds, "subseed": -1,
        "all_subseeds": [-1] * count, "subseed_strength": 0, "width": parameters["width"],
        "height": parameters["height"], "sampler_name": a1111_sampler_label(parameters["scheduler"]),
        "cfg_scale": parameters["guidance_scale"], "steps": parameters["num_inference_steps"],
        "batch_size": echo.get("batch_size", 1), "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model_name, "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": parameters.get("strength"),
        "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [infotext(parameters, seed) for seed in seeds], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1, "is_using_inpainting_conditioning": False,
    }


def _idle_progress() -> dict:
    """GET progress: this server does not track a job across requests, so it always answers idle (A1111's
    answer between jobs), which is what clients poll for before changing models."""
    return {"progress": 0.0, "eta_relative": 0.0, "state": {
        "skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
        "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}, "current_image": None,
        "textinfo": None}


def _upscalers() -> list:
    """GET upscalers: A1111 always lists "None"; SillyTavern reads this list for its hires-fix menu."""
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}]


# --- Errors ---------------------------------------------------------------------------------------------------

def a1111_rejection(rejection: Rejection, params: Mapping[str, str], body: Mapping[str, Any]) -> Rejection:
    """A contract rejection with its field named as the client named it (num_inference_steps -> steps)."""
    name = params.get(rejection.field)
    if name is None:
        return rejection
    value = body.get(name)
    origin = name if name in ("init_images", "mask", "prompt") else f"{name}={shown(value)}"
    if name == "batch_size":
        origin += f" x n_iter={shown(body.get('n_iter', 1))}"
    return Rejection(rejection.reason, f"{rejection.message} (from {origin})", name)


def error_reply(rejection: Rejection) -> Reply:
    """A1111's error body: ``{"error": <kind>, "detail": <message>, "body": "", "errors": <message>}``, plus the
    field at fault."""
    document = {"error": rejection.reason, "detail": rejection.message, "body": "", "errors": rejection.message,
                "field": rejection.field}
    return Reply(status_of(rejection), json.dumps(document).encode(), failure=rejection)


# --- Helpers --------------------------------------------------------------------------------------------------

def _lora_tags(prompt) -> tuple[Any, list]:
    """``a cat <lora:ink:0.8>`` -> (``a cat``, [{"name": "ink", "scale": 0.8}]); the contract judges names."""
    if not isinstance(prompt, str):
        return prompt, []
    loras = []
    for match in LORA_TAG.finditer(prompt):
        weight = (match.group(2) or "").strip()
        try:
            scale = float(weight) if weight else 1.0
        except ValueError:
            raise invalid("prompt", f"the LoRA tag {shown(match.group(0))} has the weight {shown(weight)}; write "
                          "<lora:NAME:WEIGHT> with a number, e.g. <lora:ink:0.8>") from None
        loras.append({"name": match.group(1).strip(), "scale": scale})
    return " ".join(LORA_TAG.sub(" ", prompt).split()) if loras else prompt, loras


def _base64_of(value: str) -> str:
    """A base64 image as A1111 takes it: plain, or a ``data:image/...;base64,`` URL. URLs are not fetched."""
    if value.startswith(("http://", "https://")):
        raise invalid("init_images", "image URLs are not fetched by this server; send the image as base64")
    if value.startswith("data:"):
        return value.split(",", 1)[-1]
    return value


def _json_body(request: HttpRequest) -> dict:
    body, from_form = request.fields()
    if from_form:
        raise Rejection(INVALID_BODY, "send a JSON body (Content-Type: application/json), as A1111's API takes")
    return body


def _has_body(row: Mapping[str, Any]) -> bool:
    payload = row.get("body", row.get("data"))
    return bool(payload) and bool(bytes(payload).strip() if isinstance(payload, (bytes, bytearray))
                                  else str(payload).strip())


def _same(value, allowed) -> bool:
    """JSON equality without Python's True == 1 (a client's true is not A1111's 1)."""
    if isinstance(value, bool) != isinstance(allowed, bool):
        return False
    if isinstance(value, (list, tuple)) and isinstance(allowed, (list, tuple)):
        return list(value) == list(allowed)
    return value == allowed

