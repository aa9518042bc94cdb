"""Every pipeline family served through one real TorchServe: tiny random pipelines of each real layout.

Each family is archived twice, by ``build_mar.sh --tiny --family F`` and by ``--model-dir`` on the folder that
build made (as a no-archive folder), and both must serve the same image.
"""

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import run_build_mar
from harness.local_server import LocalTorchServe
from builder.families import FAMILIES

pytestmark = pytest.mark.serving

SMALL = {"prompt": "a cat", "seed": 1, "num_inference_steps": 2, "width": 64, "height": 64}


def model_name(family: str) -> str:
    return family.replace("-", "_")


@pytest.fixture(scope="module")
def family_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("families")
    store = work / "store"
    models = {}
    for family in FAMILIES:
        name = model_name(family)
        run_build_mar("--tiny", "--family", family, "--name", name, "--export-path", store, "--work-dir", work)
        run_build_mar("--model-dir", work / f"tiny-{family}", "--name", f"{name}_dir", "--archive-format",
                      "no-archive", "--export-path", store, "--work-dir", work / "scratch")
        models[name] = f"{name}.mar"
        models[f"{name}_dir"] = f"{name}_dir"
    server = LocalTorchServe(work / "server", store, models)
    server.start(timeout=600)
    yield server
    server.stop()
    assert not server.processes()


def post(server, model, body, **headers):
    return requests.post(f"{server.inference_url}/predictions/{model}", json=body, timeout=300,
                         headers={**server.inference_headers(), **headers})


def npy(response) -> np.ndarray:
    assert response.status_code == 200, response.text[:300]
    return np.load(io.BytesIO(response.content))


def png(array) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_serves_the_same_image_from_both_builds(family_server, family):
    name = model_name(family)
    tiny = npy(post(family_server, name, {**SMALL, "output_format": "npy"}))
    from_folder = npy(post(family_server, f"{name}_dir", {**SMALL, "output_format": "npy"}))
    assert tiny.shape == (64, 64, 3)
    assert np.array_equal(tiny, from_folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_runs_image_to_image_and_inpainting(family_server, family):
    source = np.full((64, 64, 3), 150, dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    base = {**SMALL, "image": png(source), "output_format": "npy"}
    assert npy(post(family_server, model_name(family), {**base, "strength": 0.9})).shape == (64, 64, 3)
    assert npy(post(family_server, model_name(family), {**base, "mask_image": png(mask)})).shape == (64, 64, 3)


@pytest.mark.parametrize("family, body, field, fragment", [
    ("sd3", {"width": 72}, "width", "multiple of 16"),
    ("flux", {"height": 72}, "height", "multiple of 16"),
    ("sd3", {"scheduler": "ddim"}, "scheduler", "flow_match_euler"),
    ("flux", {"scheduler": "euler_a"}, "scheduler", "flow_match_euler"),
    ("flux", {"negative_prompt": "blurry"}, "negative_prompt", "not supported by FluxPipeline"),
    ("sdxl", {"scheduler": "flow_match_euler"}, "scheduler", "euler_a"),
])
def test_family_specific_errors(family_server, family, body, field, fragment):
    response = post(family_server, model_name(family), {**SMALL, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["field"] == field and fragment in error["message"]


@pytest.mark.parametrize("family, body", [
    ("sd3", {"width": 80, "scheduler": "flow_match_euler", "negative_prompt": "blurry"}),
    ("flux", {"width": 80, "guidance_scale": 3.5}),
    ("sdxl", {"width": 72, "scheduler": "euler_a", "negative_prompt": "blurry"}),
    ("sd2-v", {"width": 72, "scheduler": "dpmpp_2m"}),
])
def test_family_specific_fields_that_work(family_server, family, body):
    image = npy(post(family_server, model_name(family), {**SMALL, **body, "output_format": "npy"}))
    assert image.shape == (64, body["width"], 3)


def test_safety_checker_flags_are_reported_and_counted(family_server):
    response = post(family_server, "sd1_safety", {**SMALL, "num_images": 2, "output_format": "json"})
    assert response.status_code == 200
    assert response.headers["X-NSFW"] == "true,true" and response.json()["nsfw"] == [True, True]
    image = np.array(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))
    assert image.max() == 0  # the pipeline blacks out flagged images
    assert "X-NSFW" not in post(family_server, "sd1", SMALL).headers
    metrics = requests.get(f"{family_server.metrics_url}/metrics", timeout=30).text
    assert any(line.startswith("NSFWFlaggedImages") and 'ModelName="sd1_safety"' in line
               and float(line.rsplit(" ", 1)[1]) >= 2 for line in metrics.splitlines())
