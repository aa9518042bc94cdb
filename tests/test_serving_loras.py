"""LoRA through a real TorchServe: an archive built by build_mar.sh with packed LoRAs (diffusers and kohya
format) plus an operator's lora_dir, 64x64 images in 2 steps, batchSize 4 for mixed LoRA sets.

The tiny LoRAs are random PEFT weights made offline (builder/tiny_adapters.py); ``a`` and ``a_kohya`` hold the
same weights in the two formats, so they must give the same image.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from builder.tiny_adapters import make_tiny_lora
from builder.tiny_pipeline import build_tiny_pipeline
from helpers import (SMALL, batches_in, error_of, json_images, log_offset, log_since, management, predict,
                     run_build_mar, write_model_config, running_server)

pytestmark = pytest.mark.serving

MAX_ROUNDS = 6
BASE = {"prompt": "a cat", "seed": 11, "output_format": "json", **SMALL}


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("loras")
    build_tiny_pipeline(work / "sd1", "sd1")
    build_tiny_pipeline(work / "sdxl", "sdxl")
    packed = work / "packed"
    mounted = work / "mounted"
    make_tiny_lora(work / "sd1", packed / "a.safetensors", seed=1)
    make_tiny_lora(work / "sd1", packed / "a_kohya.safetensors", seed=1, lora_format="kohya")
    make_tiny_lora(work / "sd1", packed / "b.safetensors", seed=2)
    make_tiny_lora(work / "sd1", mounted / "c.safetensors", seed=3)
    make_tiny_lora(work / "sdxl", mounted / "xl.safetensors", seed=3)  # another family: dropped at start-up
    config = write_model_config(work / "model-config.yaml",
                                {"batchSize": 4, "maxBatchDelay": 500, "minWorkers": 1, "maxWorkers": 1},
                                {"warmup": False, "lora_dir": str(mounted), "max_loras": 2, "max_loaded_loras": 2})
    run_build_mar("--model-dir", work / "sd1", "--config-file", config, "--export-path", work / "store",
                  "--work-dir", work / "scratch", *[argument for name in ("a", "a_kohya", "b")
                                                      for argument in ("--lora", f"{name}={packed / name}.safetensors")])
    with running_server(work / "server", work / "store" / "stable_diffusion.mar") as server:
        yield server


def generate(server, **fields) -> np.ndarray:
    response = predict(server, {**BASE, **fields})
    assert response.status_code == 200, response.text[:300]
    (image,) = json_images(response.json())
    return image.astype(int)


@pytest.fixture(scope="module")
def alone(lora_server) -> dict:
    """Each LoRA set's image of BASE's seed, each request sent alone."""
    sets = {"base": [], "a": [{"name": "a"}], "a0": [{"name": "a", "scale": 0.0}],
            "a_kohya": [{"name": "a_kohya"}], "b": [{"name": "b"}], "ab": [{"name": "a"}, {"name": "b"}],
            "c": [{"name": "c", "scale": 0.8}]}
    return {key: generate(lora_server, **({"loras": loras} if loras else {})) for key, loras in sets.items()}


def test_the_described_capabilities_list_the_loras_that_fit(lora_server):
    response = management(lora_server, "GET", "/models/stable_diffusion?customized=true")
    metadata = response.json()[0]["customizedMetadata"]
    assert metadata["capabilities"]["loras"] == ["a", "a_kohya", "b", "c"]
    assert metadata["request_schema"]["properties"]["loras"]["items"]["properties"]["name"]["enum"] == \
        ["a", "a_kohya", "b", "c"]


def test_scale_0_is_the_base_image_and_scale_1_differs(alone):
    assert np.array_equal(alone["a0"], alone["base"])
    assert np.abs(alone["a"] - alone["base"]).max() > 10


def test_two_loras_differ_from_either_alone_and_the_kohya_file_equals_its_diffusers_twin(alone):
    assert np.abs(alone["ab"] - alone["a"]).max() > 10 and np.abs(alone["ab"] - alone["b"]).max() > 10
    assert np.abs(alone["a_kohya"] - alone["a"]).max() <= 2
    assert np.abs(alone["c"] - alone["base"]).max() > 10  # from lora_dir


def test_the_response_parameters_name_the_loras(lora_server):
    response = predict(lora_server, {**BASE, "loras": [{"name": "b", "scale": 0.5}, {"name": "a"}]})
    assert response.json()["parameters"]["loras"] == [{"name": "a", "scale": 1.0}, {"name": "b", "scale": 0.5}]


def test_unknown_names_and_too_many_loras_are_400s_listing_what_is_available(lora_server):
    response = predict(lora_server, {**BASE, "loras": [{"name": "xl"}]})
    assert response.status_code == 400
    error = error_of(response)
    assert error["field"] == "loras" and "available: ['a', 'a_kohya', 'b', 'c']" in error["message"]
    response = predict(lora_server, {**BASE, "loras": [{"name": "a"}, {"name": "b"}, {"name": "c"}]})
    assert response.status_code == 400 and "at most 2" in error_of(response)["message"]


def test_a_seed_gives_the_same_image_batched_with_other_lora_sets_as_alone(lora_server, alone):
    """Five requests sent together: four LoRA sets (two requests share one), each must equal its image alone
    (max_loaded_loras is 2, so the batch also unloads and reloads adapters)."""
    keys = ["base", "ab", "c", "a", "a"]
    loras = {"base": None, "ab": [{"name": "b"}, {"name": "a"}], "c": [{"name": "c", "scale": 0.8}],
             "a": [{"name": "a"}]}
    bodies = [{**BASE, **({"loras": loras[key]} if loras[key] else {})} for key in keys]
    offset = log_offset(lora_server)
    for _ in range(MAX_ROUNDS):
        with ThreadPoolExecutor(len(bodies)) as pool:
            replies = list(pool.map(lambda body: predict(lora_server, body), bodies))
        assert all(reply.status_code == 200 for reply in replies), [reply.text[:200] for reply in replies]
        for key, reply in zip(keys, replies):
            (image,) = json_images(reply.json())
            assert np.abs(image.astype(int) - alone[key]).max() <= 2, key
        shared = [reply.json()["timings_ms"]["batch_images"] for reply in replies]
        assert shared[:3] == [1, 1, 1]  # no other request has their LoRA set
        if any(batch.size >= 3 for batch in batches_in(log_since(lora_server, offset))):
            return
    pytest.fail(f"TorchServe never batched 3 or more of the requests together in {MAX_ROUNDS} rounds")
