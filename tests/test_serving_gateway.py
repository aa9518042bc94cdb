"""One address for two models (scripts/multinode.sh start --model ... --model ...): nginx's njs gateway in
front of two TorchServe nodes, each serving both models, driven by the real clients.

The two models are the tiny archive under two names, so they make the same pixels: which model answered is
read from the images' metadata (the infotext's ``Model``, the JSON's ``model``), which the worker writes from
the name TorchServe gave it. The gateway key goes as a Bearer token (openai SDK) or as the password of HTTP
Basic (A1111 clients, as A1111's --api-auth).
"""

import base64
import io
import json
import subprocess
import threading
import time

import openai
import pytest
import requests
import webuiapi
from PIL import Image

from harness.multinode import ClusterState
from helpers import REPO_ROOT
from test_infotext import parse_infotext

pytestmark = pytest.mark.serving

SCRIPT = REPO_ROOT / "scripts" / "multinode.sh"
MODELS = ("sd-a", "sd-b")
TINY = {"steps": 2, "width": 64, "height": 64}


def multinode(run_dir, *arguments) -> None:
    subprocess.run([str(SCRIPT), "--run-dir", str(run_dir), *arguments], check=True, timeout=900)


@pytest.fixture(scope="module")
def gateway(tiny_mar, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gateway")
    try:
        multinode(run_dir, "start", "--nodes", "2", *[f"--model={name}={tiny_mar}" for name in MODELS])
        yield ClusterState.load(run_dir)
    finally:
        if (run_dir / "state.json").exists():
            multinode(run_dir, "stop")


def basic(state: ClusterState) -> tuple[str, str]:
    return ("webui", state.gateway_key())


def model_of_png(b64: str) -> str:
    return json.loads(Image.open(io.BytesIO(base64.b64decode(b64))).text["generation"])["model"]


def test_webuiapi_lists_both_models_and_each_request_reaches_the_one_it_names(gateway):
    api = webuiapi.WebUIApi(baseurl=f"{gateway.url}/sdapi/v1", sampler="Euler a", steps=2)
    api.set_auth(*basic(gateway))
    assert api.util_get_model_names() == list(MODELS)
    assert "Euler a" in api.util_get_sampler_names()
    for name in MODELS:
        result = api.txt2img(prompt="a lighthouse", seed=5, width=64, height=64,
                             override_settings={"sd_model_checkpoint": name})
        assert result.info["sd_model_name"] == name
        assert parse_infotext(result.image.info["parameters"])["Model"] == name
    api.util_set_model("sd-b")  # POST options: later requests without a checkpoint go to sd-b
    assert api.get_options()["sd_model_checkpoint"] == "sd-b"
    changed = api.img2img(images=[Image.new("RGB", (64, 64), (90, 90, 90))], prompt="a lighthouse", seed=2,
                          width=64, height=64, denoising_strength=0.5, steps=4)
    assert changed.info["sd_model_name"] == "sd-b"


def test_an_unknown_model_or_credential_is_refused_in_each_protocols_shape(gateway):
    reply = requests.post(f"{gateway.url}/sdapi/v1/txt2img", auth=basic(gateway), timeout=60,
                          json={"prompt": "x", "override_settings": {"sd_model_checkpoint": "sdxl"}, **TINY})
    assert reply.status_code == 404 and reply.json()["field"] == "override_settings.sd_model_checkpoint"
    assert all(name in reply.json()["detail"] for name in MODELS)
    wrong = requests.get(f"{gateway.url}/sdapi/v1/sd-models", auth=("webui", "guess"), timeout=30)
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Basic" and "detail" in wrong.json()
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.gateway_key(), max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model="dall-e-3", prompt="x", size="64x64")
    assert caught.value.body["code"] == "model_not_found" and all(name in caught.value.body["message"]
                                                                  for name in MODELS)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="guess", max_retries=0).models.list()


def test_the_openai_sdk_picks_each_model_by_name(gateway):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.gateway_key(), max_retries=0,
                           timeout=300)
    assert [model.id for model in client.models.list()] == list(MODELS)
    for name in MODELS:
        answer = client.images.generate(model=name, prompt="a lighthouse", size="64x64",
                                        extra_body={"seed": 3, "num_inference_steps": 2})
        assert model_of_png(answer.data[0].b64_json) == name
    source = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 80, 120)).save(source, format="PNG")
    edited = client.images.edit(model="sd-b", image=("in.png", source.getvalue(), "image/png"), prompt="a boat",
                                extra_body={"seed": 1, "num_inference_steps": 4, "strength": 0.5})
    assert model_of_png(edited.data[0].b64_json) == "sd-b"


def test_open_webui_and_sillytavern_sequences_at_the_root(gateway):
    """SillyTavern sets the URL's path to /sdapi/v1/... itself, so it reaches a gateway at its root only."""
    url, auth = f"{gateway.url}/sdapi/v1", basic(gateway)
    models = requests.get(f"{url}/sd-models", auth=auth, timeout=30).json()
    options = requests.get(f"{url}/options", auth=auth, timeout=30).json()
    options["sd_model_checkpoint"] = models[0]["title"]  # Open WebUI posts the whole object back
    assert requests.post(f"{url}/options", json=options, auth=auth, timeout=60).status_code == 200
    owui = requests.post(f"{url}/txt2img", auth=auth, timeout=300,
                         json={"prompt": "a lighthouse", "batch_size": 1, "cfg_scale": 7, **TINY})
    assert owui.status_code == 200 and json.loads(owui.json()["info"])["sd_model_name"] == models[0]["title"]
    for route in ("samplers", "schedulers", "sd-vae", "upscalers", "latent-upscale-modes", "progress"):
        assert requests.get(f"{url}/{route}", auth=auth, timeout=30).status_code == 200, route
    assert requests.post(f"{url}/options", json={"sd_model_checkpoint": "sd-b"}, auth=auth, timeout=60).ok
    tavern = requests.post(f"{url}/txt2img", auth=auth, timeout=300, json={
        "url": gateway.url, "auth": ":".join(auth), "prompt": "a lighthouse", "negative_prompt": "",
        "sampler_name": "Euler a", "scheduler": "Automatic", "cfg_scale": 7, "restore_faces": False,
        "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2, "denoising_strength": 0.7,
        "hr_second_pass_steps": 0, "override_settings": {"CLIP_stop_at_last_layers": 1},
        "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True, "send_images": True,
        "do_not_save_grid": False, "do_not_save_samples": False, **TINY})
    assert tavern.status_code == 200, tavern.text[:300]
    assert json.loads(tavern.json()["info"])["sd_model_name"] == "sd-b"


def test_requests_during_a_node_restart_never_get_a_400(gateway):
    """Issue 20 item 13: a restarted node draws a new key; nginx must not forward with the old one meanwhile."""
    multinode(gateway.run_dir, "kill-node", "1")
    restarted = threading.Event()

    def restart():
        try:
            multinode(gateway.run_dir, "restart-node", "1")
        finally:
            restarted.set()

    thread = threading.Thread(target=restart)
    thread.start()
    statuses = []
    while not restarted.is_set():
        reply = requests.post(f"{gateway.url}/sdapi/v1/txt2img", auth=basic(gateway), timeout=300,
                              json={"prompt": "a lighthouse", "seed": len(statuses), **TINY})
        statuses.append(reply.status_code)
        time.sleep(0.2)
    thread.join()
    after = [requests.post(f"{gateway.url}/sdapi/v1/txt2img", auth=basic(gateway), timeout=300,
                           json={"prompt": "a lighthouse", "seed": seed, **TINY}).status_code for seed in range(4)]
    assert statuses and set(statuses) == {200}, statuses
    assert after == [200] * 4
    log = open(f"{gateway.run_dir}/nginx-nodes.log").read()
    assert " 400 " not in log  # no request reached a node with a stale key
