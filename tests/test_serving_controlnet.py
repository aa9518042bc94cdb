"""ControlNets and outpainting through a real TorchServe: a tiny SD 1 archive built by build_mar.sh with two
tiny random ControlNets (builder/tiny_controlnets.py), dynamic batching on (batchSize 4, one worker).

Whether TorchServe puts concurrent requests into one handler call is its choice: the batching test retries a
few rounds until requests with the same ControlNet shared a pipeline call, and checks every answer on its own.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from helpers import (
    CONTROLNET_NAMES, REPO_ROOT, SMALL, error_of, json_images, management, png_base64, predict, run_build_mar, solid,
    write_model_config, running_server,
)

pytestmark = pytest.mark.serving

EDGES, DEPTH = CONTROLNET_NAMES
BODY = {"prompt": "a cat", "seed": 5, "output_format": "json", **SMALL}


def half_white(vertical: bool) -> str:
    """A condition map with one straight edge: the left (or top) half white."""
    image = solid(64, 64, 0)
    if vertical:
        image[:, :32] = 255
    else:
        image[:32] = 255
    return png_base64(image)


# Shapes, not noise: the ControlNet sees its condition at 1/8 of the side, where noise averages to grey.
PHOTO, OTHER_PHOTO = half_white(vertical=True), half_white(vertical=False)
NOT_AN_IMAGE = "bm90IGFuIGltYWdl"  # valid base64 of "not an image"
MAX_ROUNDS = 6


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with the tiny SD 1 pipeline and two ControlNets made from its UNet with different seeds."""
    from builder.tiny_controlnets import build_tiny_controlnet
    from builder.tiny_pipeline import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("controlnet")
    build_tiny_pipeline(folder / "tiny-sd1", "sd1")
    for seed, name in enumerate(CONTROLNET_NAMES, start=1):
        build_tiny_controlnet(folder / "tiny-sd1", folder / name, seed=seed)
    return folder


@pytest.fixture(scope="module")
def server(work):
    config = write_model_config(work / "model-config.yaml",
                                {"batchSize": 4, "maxBatchDelay": 1000, "minWorkers": 1, "maxWorkers": 1},
                                {"warmup": False})
    run_build_mar("--tiny", "--config-file", config, "--export-path", work / "store", "--work-dir", work / "scratch",
                  *[f"--controlnet={name}={work / name}" for name in CONTROLNET_NAMES])
    with running_server(work / "server", work / "store" / "stable_diffusion.mar") as served:
        yield served


def image_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text[:300]
    (image,) = json_images(response.json())
    return image.astype(int)


def test_a_controlnet_steers_the_image_and_the_model_lists_its_controlnets(server):
    response = management(server, "GET", "/models/stable_diffusion?customized=true")
    described = response.json()[0]["customizedMetadata"]
    assert described["capabilities"]["controlnets"] == sorted(CONTROLNET_NAMES)
    assert set(described["request_schema"]["properties"]["controlnet"]["anyOf"][0]["enum"]) == set(CONTROLNET_NAMES)
    plain = image_of(predict(server, BODY))
    steered = predict(server, {**BODY, "controlnet": EDGES, "control_image": PHOTO})
    assert np.abs(image_of(steered) - plain).max() > 10
    parameters = steered.json()["parameters"]
    assert parameters["controlnet"] == [EDGES] and parameters["controlnet_conditioning_scale"] == [1.0]
    # Image-to-image takes a ControlNet too.
    image_to_image = {**BODY, "image": OTHER_PHOTO, "strength": 0.9}
    assert np.abs(image_of(predict(server, {**image_to_image, "controlnet": EDGES, "control_image": PHOTO}))
                  - image_of(predict(server, image_to_image))).max() > 10


def test_canny_preprocessing_and_two_controlnets(server):
    body = {**BODY, "controlnet": EDGES, "control_image": PHOTO}
    as_map = image_of(predict(server, body))
    edges = image_of(predict(server, {**body, "control_preprocess": "canny", "canny_low": 50, "canny_high": 150}))
    assert np.abs(edges - as_map).max() > 10
    both = predict(server, {**BODY, "controlnet": [EDGES, DEPTH], "control_image": [PHOTO, OTHER_PHOTO],
                            "controlnet_conditioning_scale": [1.0, 0.5], "control_preprocess": ["canny", "none"]})
    assert np.abs(image_of(both) - as_map).max() > 10
    assert both.json()["parameters"]["controlnet_conditioning_scale"] == [1.0, 0.5]


def test_mixed_controlnet_sets_batch_apart_and_a_bad_control_image_fails_alone(server):
    bodies = [
        {**BODY, "seed": 11, "controlnet": EDGES, "control_image": PHOTO},
        {**BODY, "seed": 12, "prompt": "a dog", "controlnet": EDGES, "control_image": OTHER_PHOTO},
        {**BODY, "seed": 13, "controlnet": DEPTH, "control_image": PHOTO},
        {**BODY, "seed": 14, "controlnet": EDGES, "control_image": NOT_AN_IMAGE},
    ]
    grouped = None
    for _ in range(MAX_ROUNDS):
        with ThreadPoolExecutor(len(bodies)) as pool:
            replies = list(pool.map(lambda body: predict(server, body), bodies))
        assert [reply.status_code for reply in replies] == [200, 200, 200, 400], [r.text[:200] for r in replies]
        error = error_of(replies[3])
        assert error["field"] == "control_image" and error["reason"] == "invalid_image"
        calls = [reply.json()["timings_ms"]["batch_images"] for reply in replies[:3]]
        assert calls[2] == 1, "a request with another ControlNet shared a pipeline call"
        if calls[:2] == [2, 2]:
            grouped = replies
            break
    assert grouped is not None, f"requests with the same ControlNet never shared a call in {MAX_ROUNDS} rounds"
    alone = predict(server, bodies[0])
    assert alone.json()["timings_ms"]["batch_images"] == 1
    assert np.abs(image_of(alone) - image_of(grouped[0])).max() <= 2


@pytest.mark.parametrize("body, field, words", [
    ({"controlnet": "pose", "control_image": PHOTO}, "controlnet", list(CONTROLNET_NAMES)),
    ({"controlnet": [EDGES, DEPTH], "control_image": PHOTO}, "controlnet", ["control_image", "2"]),
    ({"controlnet": EDGES}, "controlnet", ["control_image"]),
    ({"controlnet": EDGES, "control_image": PHOTO, "control_guidance_start": 0.5, "control_guidance_end": 0.5},
     "control_guidance_start", ["control_guidance_end"]),
    ({"controlnet": EDGES, "control_image": PHOTO, "control_preprocess": "canny", "canny_low": 200,
      "canny_high": 100}, "canny_low", ["canny_high"]),
])
def test_controlnet_mistakes_are_400s_naming_the_field(server, body, field, words):
    error = error_of(predict(server, {**BODY, **body}))
    assert error["code"] == 400 and error["field"] == field
    assert all(str(word) in error["message"] for word in words), error["message"]


def test_outpainting_extends_the_canvas_and_the_limits_apply_to_the_result(server):
    image = png_base64(solid(64, 56, 90))
    body = {"prompt": "a cat", "seed": 1, "num_inference_steps": 2, "output_format": "json", "image": image}
    reply = predict(server, {**body, "outpaint": {"left": 8, "right": 16, "top": 5}})
    # 64 + 8 + 16 = 88 wide; 56 + 5 = 61 high, rounded up to the size multiple 8: 64.
    assert image_of(reply).shape == (64, 88, 3)
    assert reply.json()["parameters"]["task"] == "inpainting"
    too_wide = error_of(predict(server, {**body, "outpaint": {"right": 1000}}))
    assert too_wide["field"] == "outpaint" and "1064" in too_wide["message"] and "1024" in too_wide["message"]
    with_size = error_of(predict(server, {**body, "outpaint": {"left": 8}, "width": 64}))
    assert with_size["field"] == "outpaint" and "width" in with_size["message"]


def test_a_controlnet_of_another_family_is_refused_at_build_time(work):
    from builder.tiny_controlnets import build_tiny_controlnet
    from builder.tiny_pipeline import build_tiny_pipeline

    build_tiny_pipeline(work / "tiny-sdxl", "sdxl")
    build_tiny_controlnet(work / "tiny-sdxl", work / "sdxl-edges")
    built = subprocess.run([str(REPO_ROOT / "build_mar.sh"), "--tiny", "--export-path", work / "refused",
                            "--work-dir", work / "scratch-refused", "--controlnet", f"edges={work / 'sdxl-edges'}"],
                           capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert built.returncode != 0
    assert str(work / "sdxl-edges") in built.stderr and "cross_attention_dim" in built.stderr, built.stderr[-500:]
    assert not (work / "refused" / "stable_diffusion.mar").exists()
