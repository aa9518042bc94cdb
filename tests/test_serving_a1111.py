"""The AUTOMATIC1111 API through a real TorchServe: the ``webuiapi`` client, and Open WebUI's and SillyTavern's
call sequences replayed with ``requests``.

The sequences are read from the clients' source (open-webui backend/open_webui/routers/images.py;
SillyTavern src/endpoints/stable-diffusion.js and public/scripts/extensions/stable-diffusion/index.js): the
paths, methods and bodies they send and the keys they read back. One model here; through the gateway with
two models in tests/test_serving_gateway.py. The native route's answer for the same seed is the reference.
"""

import base64
import io
import json

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

from helpers import MODEL, json_images, predict
from test_infotext import parse_infotext

pytestmark = pytest.mark.serving

TINY = {"steps": 2, "width": 64, "height": 64}


def base_url(server) -> str:
    return f"{server.inference_url}/predictions/{MODEL}/1.0/sdapi/v1"


def bearer(server) -> dict:
    return {"Authorization": f"Bearer {server.keys()['inference']['key']}"}


def webui(server) -> webuiapi.WebUIApi:
    api = webuiapi.WebUIApi(baseurl=base_url(server), sampler="Euler a", steps=2)
    api.session.headers.update(bearer(server))  # TorchServe's inference key (the gateway takes HTTP Basic too)
    return api


def native_image(server, seed: int, **fields) -> np.ndarray:
    """The same generation through the native route: A1111's default cfg_scale is 7.0."""
    body = {"prompt": "a lighthouse", "seed": seed, "num_inference_steps": 2, "width": 64, "height": 64,
            "guidance_scale": 7.0, "output_format": "json", **fields}
    return json_images(predict(server, body).json())[0]


def test_webuiapi_lists_models_and_samplers_and_makes_the_native_image(torchserve):
    api = webui(torchserve)
    assert api.util_get_model_names() == [MODEL]
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= set(api.util_get_sampler_names())
    assert "karras" in api.util_get_scheduler_names()
    result = api.txt2img(prompt="a lighthouse", seed=11, width=64, height=64, sampler_name="Euler a")
    assert result.image.size == (64, 64)
    assert result.info["all_seeds"] == [11] and result.info["sd_model_name"] == MODEL
    assert np.array_equal(np.asarray(result.image.convert("RGB")),
                          native_image(torchserve, 11, scheduler="euler_a"))
    parsed = parse_infotext(result.image.info["parameters"])
    assert (parsed["Sampler"], parsed["Seed"], parsed["Model"], parsed["Size"]) == ("Euler a", "11", MODEL, "64x64")


def test_webuiapi_img2img_and_inpainting(torchserve):
    api = webui(torchserve)
    source = Image.fromarray(np.full((64, 64, 3), 120, np.uint8))
    changed = api.img2img(images=[source], prompt="a lighthouse", seed=4, width=64, height=64,
                          denoising_strength=0.5, steps=4)
    assert changed.image.size == (64, 64)
    assert parse_infotext(changed.info["infotexts"][0])["Denoising strength"] == "0.5"
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    inpainted = api.img2img(images=[source], mask_image=Image.fromarray(mask), mask_blur=0, prompt="a lighthouse",
                            seed=4, width=64, height=64, denoising_strength=1.0, steps=2)
    assert inpainted.image.size == (64, 64)
    refused = requests.post(f"{base_url(torchserve)}/img2img", headers=bearer(torchserve), timeout=60,
                            json={"prompt": "x", "init_images": [], **TINY})
    assert refused.status_code == 400 and refused.json()["field"] == "init_images"


def test_open_webui_sequence(torchserve):
    """Verify the URL (GET options), list models, set the model (GET options, POST them back), generate."""
    url, headers = base_url(torchserve), bearer(torchserve)
    assert requests.get(f"{url}/options", headers=headers, timeout=30).status_code == 200
    models = requests.get(f"{url}/sd-models", headers=headers, timeout=30).json()
    assert [(model["title"], model["model_name"]) for model in models] == [(MODEL, MODEL)]
    options = requests.get(f"{url}/options", headers=headers, timeout=30).json()
    options["sd_model_checkpoint"] = models[0]["title"]
    assert requests.post(f"{url}/options", json=options, headers=headers, timeout=30).status_code == 200
    reply = requests.post(f"{url}/txt2img", headers=headers, timeout=300, json={
        "prompt": "a lighthouse", "batch_size": 2, "negative_prompt": "fog", "cfg_scale": 7,
        "sampler_name": "Euler a", "scheduler": "Automatic", **TINY})
    assert reply.status_code == 200, reply.text[:300]
    document = reply.json()
    assert len(document["images"]) == 2 and len(json.loads(document["info"])["all_seeds"]) == 2
    first = Image.open(io.BytesIO(base64.b64decode(document["images"][0])))
    assert parse_infotext(first.info["parameters"])["Negative prompt"] == "fog"


def test_sillytavern_sequence(torchserve):
    """Ping (GET options), list samplers, schedulers, models, VAEs and upscalers, read the model, set it and
    poll progress until idle, then generate with the whole body SillyTavern sends (its url and auth too)."""
    url, headers = base_url(torchserve), bearer(torchserve)
    for route in ("options", "samplers", "schedulers", "sd-models", "sd-vae", "upscalers", "latent-upscale-modes"):
        reply = requests.get(f"{url}/{route}", headers=headers, timeout=30)
        assert reply.status_code == 200, (route, reply.text[:200])
    assert requests.get(f"{url}/options", headers=headers, timeout=30).json()["sd_model_checkpoint"] == MODEL
    assert requests.post(f"{url}/options", json={"sd_model_checkpoint": MODEL}, headers=headers,
                         timeout=30).status_code == 200
    progress = requests.get(f"{url}/progress", headers=headers, timeout=30).json()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    body = {"url": url, "auth": "", "prompt": "a lighthouse", "negative_prompt": "", "sampler_name": "DPM++ 2M",
            "scheduler": "karras", "cfg_scale": 7, "restore_faces": False, "enable_hr": False,
            "hr_upscaler": "Latent", "hr_scale": 2, "denoising_strength": 0.7, "hr_second_pass_steps": 0,
            "seed": 21, "override_settings": {"CLIP_stop_at_last_layers": 1},
            "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False, **TINY}
    reply = requests.post(f"{url}/txt2img", json=body, headers=headers, timeout=300)
    assert reply.status_code == 200, reply.text[:300]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(reply.json()["images"][0]))).convert("RGB"))
    assert np.array_equal(image, native_image(torchserve, 21, scheduler="dpmpp_2m_karras"))


def test_errors_are_in_a1111s_shape_and_the_worker_keeps_serving(torchserve):
    url, headers = base_url(torchserve), bearer(torchserve)
    unknown_model = requests.post(f"{url}/txt2img", headers=headers, timeout=60, json={
        "prompt": "x", "override_settings": {"sd_model_checkpoint": "sdxl-base"}, **TINY})
    assert unknown_model.status_code == 404
    assert set(unknown_model.json()) >= {"error", "detail", "body", "errors"}
    assert MODEL in unknown_model.json()["detail"]
    bad = requests.post(f"{url}/txt2img", headers=headers, timeout=60, json={"prompt": "x", "steps": 0})
    assert bad.status_code == 400 and bad.json()["field"] == "steps"
    assert requests.get(f"{url}/interrogate", headers=headers, timeout=60).status_code == 404
    assert requests.post(f"{url}/txt2img", headers=headers, timeout=300, json={"prompt": "x", **TINY}).ok
