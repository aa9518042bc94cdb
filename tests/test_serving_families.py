"""Every pipeline family served through one real TorchServe: tiny random pipelines of each real layout.

Each family is archived twice, by ``build_mar.sh --tiny --family F`` and by ``--model-dir`` on the folder that
build made (as a no-archive folder), and both must serve the same image.
"""

import json

import numpy as np
import pytest
import requests

from builder.families import FAMILIES
from harness.local_server import LocalTorchServe
from helpers import (
    SMALL, capabilities_of_family, error_of, json_images, management, npy, png_base64, predict, run_build_mar,
    shipped_settings, solid, stop_server, write_model_config,
)

pytestmark = pytest.mark.serving

BODY = {"prompt": "a cat", "seed": 1, **SMALL}


def model_name(family: str) -> str:
    return family.replace("-", "_")


@pytest.fixture(scope="module")
def family_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("families")
    store = work / "store"
    # Twelve workers on a few cores: no warm-up generation, or start-up takes minutes.
    config = write_model_config(work / "model-config.yaml", handler_settings={"warmup": False})
    models = {}
    for family in FAMILIES:
        name = model_name(family)
        run_build_mar("--tiny", "--family", family, "--name", name, "--config-file", config, "--export-path", store,
                      "--work-dir", work)
        run_build_mar("--model-dir", work / f"tiny-{family}", "--name", f"{name}_dir", "--archive-format",
                      "no-archive", "--config-file", config, "--export-path", store, "--work-dir", work / "scratch")
        models[name] = f"{name}.mar"
        models[f"{name}_dir"] = f"{name}_dir"
    server = LocalTorchServe(work / "server", store, models)
    server.start(timeout=600)
    try:
        yield server
    finally:
        stop_server(server)


def post(server, model, body, **headers):
    return predict(server, body, model=model, headers=headers)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_serves_the_same_image_from_both_builds(family_server, family):
    name = model_name(family)
    tiny = npy(post(family_server, name, {**BODY, "output_format": "npy"}))
    from_folder = npy(post(family_server, f"{name}_dir", {**BODY, "output_format": "npy"}))
    assert tiny.shape == (64, 64, 3)
    assert np.array_equal(tiny, from_folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_describes_its_own_contract(family_server, family):
    """The describe API of each served family shows what its loaded pipeline reports, and the schema of the
    contract built from builder/families.py's facts for that family."""
    from handler.core.contract import Contract
    from handler.protocols.native import request_schema

    expected = capabilities_of_family(family)
    for name in (model_name(family), f"{model_name(family)}_dir"):
        response = management(family_server, "GET", f"/models/{name}?customized=true")
        assert response.status_code == 200, response.text[:300]
        metadata = response.json()[0]["customizedMetadata"]
        capabilities = metadata["capabilities"]
        assert capabilities["pipeline_class"] == expected.pipeline_class
        assert capabilities["size_multiple"] == expected.size_multiple
        assert capabilities["schedulers"] == list(expected.schedulers)
        assert capabilities["negative_prompt"] == expected.negative_prompt
        assert capabilities["tasks"] == list(expected.tasks)
        served = request_schema(Contract(shipped_settings(), expected))
        assert metadata["request_schema"] == json.loads(json.dumps(served))


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_runs_image_to_image_and_inpainting(family_server, family):
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    base = {**BODY, "image": png_base64(solid(64, 64, 150)), "output_format": "npy"}
    assert npy(post(family_server, model_name(family), {**base, "strength": 0.9})).shape == (64, 64, 3)
    assert npy(post(family_server, model_name(family), {**base, "mask_image": png_base64(mask)})).shape == (64, 64, 3)


@pytest.mark.parametrize("family, body, field, fragment", [
    ("sd3", {"width": 72}, "width", "multiple of 16"),
    ("flux", {"height": 72}, "height", "multiple of 16"),
    ("sd3", {"scheduler": "ddim"}, "scheduler", "flow_match_euler"),
    ("flux", {"scheduler": "euler_a"}, "scheduler", "flow_match_euler"),
    ("flux", {"negative_prompt": "blurry"}, "negative_prompt", "not supported by FluxPipeline"),
    ("sdxl", {"scheduler": "flow_match_euler"}, "scheduler", "euler_a"),
])
def test_family_specific_errors(family_server, family, body, field, fragment):
    response = post(family_server, model_name(family), {**BODY, **body})
    assert response.status_code == 400
    error = error_of(response)
    assert error["field"] == field and fragment in error["message"]


@pytest.mark.parametrize("family, body", [
    ("sd3", {"width": 80, "scheduler": "flow_match_euler", "negative_prompt": "blurry"}),
    ("flux", {"width": 80, "guidance_scale": 3.5}),
    ("sdxl", {"width": 72, "scheduler": "euler_a", "negative_prompt": "blurry"}),
    ("sd2-v", {"width": 72, "scheduler": "dpmpp_2m"}),
])
def test_family_specific_fields_that_work(family_server, family, body):
    image = npy(post(family_server, model_name(family), {**BODY, **body, "output_format": "npy"}))
    assert image.shape == (64, body["width"], 3)


def test_safety_checker_flags_are_reported_and_counted(family_server):
    response = post(family_server, "sd1_safety", {**BODY, "num_images": 2, "output_format": "json"})
    assert response.status_code == 200
    assert response.headers["X-NSFW"] == "true,true" and response.json()["nsfw"] == [True, True]
    image = json_images(response.json())[0]
    assert image.max() == 0  # the pipeline blacks out flagged images
    assert "X-NSFW" not in post(family_server, "sd1", BODY).headers
    metrics = requests.get(f"{family_server.metrics_url}/metrics", timeout=30).text
    assert any(line.startswith("NSFWFlaggedImages") and 'ModelName="sd1_safety"' in line
               and float(line.rsplit(" ", 1)[1]) >= 2 for line in metrics.splitlines())
