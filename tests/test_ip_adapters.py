"""IP-Adapters: packed by build_mar.sh --ip-adapter, chosen per request with ip_adapter, ip_adapter_image and
ip_adapter_scale, with text-to-image, image-to-image and inpainting, batched by adapter and scale. The handler
runs in-process on tiny SD 1 and SDXL pipelines with tiny random IP-Adapters (builder/tiny_ip_adapter.py)."""

import base64
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, make_context, set_requests

SMALL = {"num_inference_steps": 2, "width": 64, "height": 64, "seed": 5, "output_format": "array"}


def picture(seed: int) -> str:
    pixels = (np.random.RandomState(seed).rand(64, 64, 3) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def served(request, tmp_path_factory):
    """(handler with one IP-Adapter, its context, the same model without IP-Adapters), per family."""
    from builder.ip_adapters import stage_ip_adapters
    from builder.tiny_ip_adapter import build_tiny_ip_adapter
    from builder.tiny_pipeline import build_tiny_pipeline
    from handler.stable_diffusion_handler import StableDiffusionHandler

    family = request.param
    work = tmp_path_factory.mktemp(f"ip-{family}")
    build_tiny_pipeline(work / "pipeline", family)
    adapter = build_tiny_ip_adapter(work / "pipeline", work / "IP-Adapter")
    handlers = []
    for name, adapters in (("with", [f"style={adapter}"]), ("without", [])):
        model_dir = work / name
        shutil.copytree(work / "pipeline", model_dir / "pipeline")
        if adapters:
            stage_ip_adapters(adapters, model_dir / "pipeline", model_dir, lambda message: None)
        handler = StableDiffusionHandler()
        context = make_context(model_dir, {"warmup": False}, batch_size=4)
        handler.initialize(context)
        handlers.append((handler, context))
    return handlers[0][0], handlers[0][1], handlers[1][0]


def answers(handler, context, *bodies):
    set_requests(context, [{"Content-Type": "application/json"}] * len(bodies))
    return handler.handle([{"body": json.dumps({**SMALL, **body}).encode()} for body in bodies], context)


def image(handler, context, **fields):
    return np.array(json.loads(answers(handler, context, {"prompt": "a castle", **fields})[0]), dtype="uint8")


def test_capabilities_and_schema_list_the_ip_adapter(served):
    handler, _, _ = served
    described = json.loads(handler.describe_handle())
    assert described["capabilities"]["ip_adapters"] == ["style"]
    properties = described["request_schema"]["properties"]
    assert properties["ip_adapter"]["enum"] == ["style"]
    assert properties["ip_adapter_scale"]["maximum"] == 2.0


def test_the_image_prompt_changes_the_image_and_scale_zero_does_not(served):
    handler, context, without = served
    plain = image(handler, context)
    np.testing.assert_array_equal(plain, image(without, context))  # loaded but unused: no effect at all
    prompted = image(handler, context, ip_adapter="style", ip_adapter_image=picture(1))
    assert not np.array_equal(prompted, plain)
    assert not np.array_equal(prompted, image(handler, context, ip_adapter="style", ip_adapter_image=picture(2)))
    np.testing.assert_array_equal(plain, image(handler, context, ip_adapter="style", ip_adapter_image=picture(1),
                                               ip_adapter_scale=0))


def test_a_batch_gives_each_request_its_image_alone(served):
    handler, context, _ = served
    bodies = [{"prompt": "a castle", "ip_adapter": "style", "ip_adapter_image": picture(1)},
              {"prompt": "a castle", "ip_adapter": "style", "ip_adapter_image": picture(2)},
              {"prompt": "a castle"}]
    together = [np.array(json.loads(body), dtype=int) for body in answers(handler, context, *bodies)]
    for body, batched in zip(bodies, together):
        alone = np.array(json.loads(answers(handler, context, body)[0]), dtype=int)
        # within 2 levels: a batched call can round differently on some CPUs (as in test_handler.py); a request
        # given its neighbour's image prompt would be off by tens
        assert np.abs(batched - alone).max() <= 2
    assert np.abs(together[0] - together[1]).max() > 2


def test_image_to_image_and_inpainting_take_the_image_prompt(served):
    handler, context, _ = served
    base = {"image": picture(7), "strength": 0.9}
    for task in ({}, {"mask_image": picture(8)}):
        plain = image(handler, context, **base, **task)
        assert not np.array_equal(plain, image(handler, context, **base, **task, ip_adapter="style",
                                               ip_adapter_image=picture(1)))


@pytest.mark.parametrize("fields, field, words", [
    ({"ip_adapter": "other", "ip_adapter_image": "x"}, "ip_adapter", "style"),
    ({"ip_adapter": "style", "ip_adapter_image": "x", "ip_adapter_scale": 2.5}, "ip_adapter_scale", "2"),
    ({"ip_adapter": "style"}, "ip_adapter", "ip_adapter_image"),
    ({"ip_adapter_image": "x"}, "ip_adapter_image", "ip_adapter"),
])
def test_bad_ip_adapter_fields_are_400s_naming_the_field(served, fields, field, words):
    handler, context, _ = served
    body = answers(handler, context, {"prompt": "a castle", **fields})[0]
    error = json.loads(body)
    assert context.get_response_status(0)[0] == 400
    assert error.get("field", field) == field and words in json.dumps(error)


def test_a_model_without_ip_adapters_refuses_the_fields(served):
    _, context, without = served
    error = json.loads(answers(without, context, {"prompt": "a castle", "ip_adapter": "style",
                                                  "ip_adapter_image": picture(1)})[0])
    assert context.get_response_status(0)[0] == 400 and "build_mar.sh --ip-adapter" in json.dumps(error)


def test_an_ip_adapter_of_another_family_is_refused_at_build_time(tmp_path):
    from builder.tiny_ip_adapter import build_tiny_ip_adapter
    from builder.tiny_pipeline import build_tiny_pipeline

    build_tiny_pipeline(tmp_path / "sd1", "sd1")
    build_tiny_pipeline(tmp_path / "sdxl", "sdxl")
    adapter = build_tiny_ip_adapter(tmp_path / "sdxl", tmp_path / "ip-sdxl")
    result = subprocess.run([str(REPO_ROOT / "build_mar.sh"), "--model-dir", str(tmp_path / "sd1"), "--ip-adapter",
                             f"face={adapter}", "--export-path", str(tmp_path / "store"), "--work-dir",
                             str(tmp_path / "work")], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "--ip-adapter face does not fit StableDiffusionPipeline" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "store" / "stable_diffusion.mar").exists()


