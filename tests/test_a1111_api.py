"""The AUTOMATIC1111 API in-process: A1111 bodies -> the contract, its GET routes, its answers and errors.

Field names, defaults and shapes come from A1111's own API (modules/api/models.py, api.py): txt2img/img2img
bodies, ``{"images", "parameters", "info"}`` answers with ``info`` a JSON string, errors
``{"error", "detail", "body", "errors"}``. Every contract range and message must come from the contract, with
the field named as the client named it.
"""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import set_requests
from handler.protocols import a1111
from handler.core.capabilities import ModelCapabilities
from handler.core.contract import Contract
from handler.core.failures import Rejection
from handler.core.generation import GenerationResult
from handler.core.schedulers import from_a1111, scheduler_names
from handler.core.settings import HandlerSettings
from handler.protocols.http import HttpRequest, ServedModel
from test_infotext import parse_infotext

CONTRACT = Contract(HandlerSettings(), ModelCapabilities(loras=("ink", "pencil")))
PROTOCOL = a1111.A1111Protocol(CONTRACT, ServedModel("tiny-sd"))
SMALL = {"steps": 2, "width": 64, "height": 64}


def read(route="txt2img", body=None, raw: bytes = None):
    payload = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
    return PROTOCOL.read(HttpRequest({"body": payload}, {"Content-Type": "application/json",
                                                         "url_path": f"sdapi/v1/{route}"}))


def refused(route, body) -> Rejection:
    with pytest.raises(Rejection) as caught:
        read(route, body)
    return caught.value


def answer(route):
    call = read(route)
    reply = PROTOCOL.respond(call, call.requests())
    assert reply.status == 200
    return json.loads(reply.body)


def png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("url_path, route", [
    ("sdapi/v1/txt2img", "txt2img"), ("/sdapi/v1/sd-models/", "sd-models"), ("sdapi/v1", ""),
    ("v1/images/generations", None), ("", None), ("sdapi/v10/x", None),
])
def test_only_url_paths_under_sdapi_v1_come_to_this_protocol(url_path, route):
    assert a1111.route_of(HttpRequest({}, {"url_path": url_path})) == route


def test_a1111_fields_and_defaults_become_the_contracts_fields():
    generation = read(body={"prompt": "a fox <lora:ink:0.5> at dusk <lora:pencil>", "negative_prompt": "",
                            "seed": 7, "batch_size": 2, "n_iter": 2, "sampler_name": "DPM++ 2M",
                            "scheduler": "Karras", "cfg_scale": 5, "steps": 3}).request
    assert generation.prompt == "a fox at dusk" and generation.negative_prompt is None
    assert generation.loras == (("ink", 0.5), ("pencil", 1.0))
    assert generation.seeds == (7, 8, 9, 10)  # batch_size x n_iter images, seed + i as in A1111
    assert generation.scheduler == "dpmpp_2m_karras" and generation.guidance_scale == 5
    defaults = read(body={"prompt": "a fox"}).request
    assert (defaults.width, defaults.height, defaults.num_inference_steps, defaults.guidance_scale) == (512, 512, 50,
                                                                                                        7.0)
    assert defaults.scheduler is None and len(defaults.seeds) == 1  # seed -1: drawn


@pytest.mark.parametrize("sampler, schedule, expected", [
    ("Euler a", None, "euler_a"), ("k_euler_a", "Automatic", "euler_a"), ("DPM++ 2M", None, "dpmpp_2m_karras"),
    ("DPM++ 2M", "uniform", "dpmpp_2m"), ("DPM++ 2M Karras", None, "dpmpp_2m_karras"), ("PLMS", "", "pndm"),
    ("Euler", "Karras", None), ("DPM++ SDE", None, None), ("DPM++ 2M Karras", "Uniform", None),
])
def test_a1111_sampler_and_schedule_names_map_to_this_servers_schedulers(sampler, schedule, expected):
    assert from_a1111(sampler, schedule, scheduler_names("discrete")) == expected


def test_what_sillytavern_sends_by_habit_is_accepted():
    """SillyTavern's txt2img body (public/scripts/extensions/stable-diffusion/index.js), at its defaults."""
    body = {"url": "http://127.0.0.1:7860", "auth": "user:secret", "prompt": "a fox", "negative_prompt": "blurry",
            "sampler_name": "DPM++ 2M", "scheduler": "karras", "cfg_scale": 7, "restore_faces": False,
            "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2, "denoising_strength": 0.7,
            "hr_second_pass_steps": 0, "override_settings": {"CLIP_stop_at_last_layers": 1},
            "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False, **SMALL}
    call = read(body=body)
    assert call.request.scheduler == "dpmpp_2m_karras"
    assert call.request.strength is None  # txt2img reads denoising_strength only with enable_hr
    assert "auth" not in call.echo and "url" not in call.echo  # a credential is never echoed back


@pytest.mark.parametrize("body, field, words", [
    ({"enable_hr": True}, "enable_hr", "hires fix is not offered"),
    ({"restore_faces": True}, "restore_faces", "only false"),
    ({"subseed_strength": 0.5}, "subseed_strength", "only 0"),
    ({"styles": ["cinematic"]}, "styles", "only an empty list"),
    ({"alwayson_scripts": {"controlnet": {}}}, "alwayson_scripts", "only an empty object"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings.CLIP_stop_at_last_layers",
     "not offered"),
    ({"sampler_name": "DPM++ SDE"}, "sampler_name", "DPM++ 2M Karras"),
    ({"sampler_name": "Euler", "scheduler": "Karras"}, "sampler_name", "is not offered by this model"),
    ({"steps": 500}, "steps", "num_inference_steps must be"),
    ({"cfg_scale": "high"}, "cfg_scale", "guidance_scale must be"),
    ({"width": 70}, "width", "multiple of 8"),
    ({"batch_size": 0}, "batch_size", "at least 1"),
    ({"batch_size": 3, "n_iter": 3}, "batch_size", "(from batch_size=3 x n_iter=3)"),
    ({"hypernetwork": "x"}, "hypernetwork", "unknown or unsupported field"),
    ({"prompt": "a fox <lora:sketch:1>"}, "prompt", "is not a LoRA of this model"),
    ({"prompt": "a fox <lora:ink:strong>"}, "prompt", "with a number"),
])
def test_what_cannot_be_honoured_is_a_400_naming_the_a1111_field(body, field, words):
    rejection = refused("txt2img", {"prompt": "a fox", **SMALL, **body})
    reply = a1111.error_reply(rejection)
    error = json.loads(reply.body)
    assert reply.status == 400 and error["field"] == field and words in error["detail"], error
    assert set(error) >= {"error", "detail", "body", "errors"}  # A1111's error shape


def test_another_model_is_a_404_naming_the_served_one():
    rejection = refused("txt2img", {"prompt": "a fox", "override_settings": {"sd_model_checkpoint": "sdxl"}})
    reply = a1111.error_reply(rejection)
    assert reply.status == 404 and "'tiny-sd'" in json.loads(reply.body)["detail"]
    assert read(body={"prompt": "a fox", "override_settings": {"sd_model_checkpoint": "tiny-sd.safetensors"}})


def test_img2img_maps_init_images_mask_and_strength():
    image = np.full((64, 64, 3), 90, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    call = read("img2img", {"prompt": "a fox", "init_images": ["data:image/png;base64," + png_base64(image)],
                            "mask": png_base64(mask), "denoising_strength": 0.5, "mask_blur": 0,
                            "inpainting_fill": 1, "inpaint_full_res": False, "include_init_images": False, **SMALL})
    generation = call.request
    assert generation.task == "inpainting" and generation.strength == 0.5
    assert np.array_equal(np.asarray(generation.mask_image.convert("L")) > 127, mask > 127)
    inverted = read("img2img", {"prompt": "a fox", "init_images": [png_base64(image)], "mask": png_base64(mask),
                                "mask_blur": 0, "inpainting_mask_invert": 1, **SMALL}).request
    assert np.array_equal(np.asarray(inverted.mask_image.convert("L")) > 127, mask <= 127)
    plain = read("img2img", {"prompt": "a fox", "init_images": [png_base64(image)], **SMALL}).request
    assert plain.task == "image-to-image" and plain.strength == 0.75  # A1111's default denoising_strength
    assert refused("img2img", {"prompt": "a fox", **SMALL}).field == "init_images"
    assert refused("img2img", {"prompt": "a fox", "init_images": [png_base64(image)], "inpainting_fill": 2,
                               **SMALL}).field == "inpainting_fill"


def test_get_routes_answer_in_a1111s_shapes():
    assert answer("sd-models") == [{"title": "tiny-sd", "model_name": "tiny-sd", "hash": None, "sha256": None,
                                    "filename": "tiny-sd", "config": None}]
    samplers = {entry["name"]: entry["aliases"] for entry in answer("samplers")}
    assert samplers["Euler a"] == ["k_euler_a", "k_euler_ancestral"] and "DPM++ 2M" in samplers
    assert [entry["label"] for entry in answer("schedulers")] == ["Automatic", "Karras", "Uniform"]
    assert answer("options")["sd_model_checkpoint"] == "tiny-sd"
    assert [entry["name"] for entry in answer("loras")] == ["ink", "pencil"]
    progress = answer("progress")
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0  # what SillyTavern polls for
    assert answer("embeddings") == {"loaded": {}, "skipped": {}}
    words = a1111.A1111Protocol(Contract(HandlerSettings(), ModelCapabilities(embeddings=("<cat-toy>",))),
                                ServedModel("tiny-sd"))
    call = words.read(HttpRequest({"body": b""}, {"url_path": "sdapi/v1/embeddings"}))
    assert list(json.loads(words.respond(call, []).body)["loaded"]) == ["<cat-toy>"]
    with pytest.raises(Rejection) as caught:
        read("extra-single-image", {"image": ""})
    assert a1111.error_reply(caught.value).status == 404


def test_post_options_takes_this_model_and_the_options_sent_back_unchanged():
    """Open WebUI reads GET options, changes sd_model_checkpoint and posts the whole object back."""
    options = answer("options")
    call = read("options", {**options, "sd_model_checkpoint": "tiny-sd"})
    assert json.loads(PROTOCOL.respond(call, call.requests()).body) is None
    assert refused("options", {"sd_model_checkpoint": "sdxl"}).field == "sd_model_checkpoint"
    assert refused("options", {"samples_format": "jpg"}).field == "samples_format"


def test_a_result_is_images_parameters_and_an_info_string_with_infotexts():
    call = read(body={"prompt": "a fox", "seed": 3, "batch_size": 2, "sampler_name": "Euler a", **SMALL})
    generation = call.request
    images = np.zeros((2, 64, 64, 3), np.uint8)
    reply = PROTOCOL.respond(call, [GenerationResult(generation, images, scheduler="euler_a", model="tiny-sd")])
    document = json.loads(reply.body)
    assert reply.status == 200 and reply.headers["X-Seeds"] == "3,4"
    assert len(document["images"]) == 2 and document["parameters"]["seed"] == 3
    assert document["parameters"]["sampler_name"] == "Euler a"
    info = json.loads(document["info"])
    assert info["all_seeds"] == [3, 4] and info["seed"] == 3 and info["sd_model_name"] == "tiny-sd"
    parsed = parse_infotext(info["infotexts"][1])
    assert parsed["Seed"] == "4" and parsed["Sampler"] == "Euler a" and parsed["Model"] == "tiny-sd"
    picture = Image.open(io.BytesIO(base64.b64decode(document["images"][1])))
    assert picture.text["parameters"] == info["infotexts"][1]
    quiet = read(body={"prompt": "a fox", "send_images": False, **SMALL})
    assert json.loads(PROTOCOL.respond(quiet, [GenerationResult(quiet.request, images[:1],
                                                            scheduler="pndm")]).body)["images"] == []


def test_an_a1111_request_batched_with_native_and_openai_requests_gives_the_image_it_gives_alone(handler_factory):
    """One pipeline call serves all three protocols; each answer has its own shape, and the A1111 image is the
    one the same request gives alone (image i keeps its own generator, whatever shares the call), within the
    rounding step a batched call may take on some CPUs (as tests/test_handler.py allows)."""
    handler, context = handler_factory()
    a1111_row = ({"body": json.dumps({"prompt": "a cat", "seed": 5, **SMALL}).encode()},
                 {"Content-Type": "application/json", "url_path": "sdapi/v1/txt2img"})
    rows = [
        a1111_row,
        ({"body": json.dumps({"prompt": "a dog", "seed": 1, "num_inference_steps": 2, "width": 64, "height": 64,
                              "guidance_scale": 7.0, "output_format": "json"}).encode()},
         {"Content-Type": "application/json"}),
        ({"body": json.dumps({"prompt": "a bird", "size": "64x64", "seed": 9, "num_inference_steps": 2,
                              "guidance_scale": 7.0}).encode()},
         {"Content-Type": "application/json", "url_path": "v1/images/generations"}),
        ({"body": b""}, {"url_path": "sdapi/v1/sd-models"}),
        ({"body": json.dumps({"prompt": "a cat", "seed": 5, **SMALL, "width": 70}).encode()},
         {"Content-Type": "application/json", "url_path": "sdapi/v1/txt2img"}),
    ]
    set_requests(context, [headers for _, headers in rows])
    bodies = handler.handle([row for row, _ in rows], context)
    assert [context.get_response_status(index)[0] for index in range(len(rows))] == [200, 200, 200, 200, 400]
    assert json.loads(bodies[1])["timings_ms"]["batch_images"] == 3  # one pipeline call for the three protocols
    assert json.loads(bodies[2])["data"][0]["b64_json"]
    assert json.loads(bodies[3])[0]["title"] == "stable_diffusion"
    assert json.loads(bodies[4])["field"] == "width"
    set_requests(context, [a1111_row[1]])
    (alone,) = handler.handle([a1111_row[0]], context)

    def pixels(body) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(json.loads(body)["images"][0]))))

    assert np.abs(pixels(bodies[0]).astype(int) - pixels(alone).astype(int)).max() <= 2
    openai_image = np.asarray(Image.open(io.BytesIO(base64.b64decode(json.loads(bodies[2])["data"][0]["b64_json"]))))
    assert not np.array_equal(pixels(bodies[0]), openai_image)
