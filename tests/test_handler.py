"""The handler driven in-process through TorchServe's handle(), on the tiny pipeline."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import set_requests

SMALL = {"num_inference_steps": 2, "width": 64, "height": 64}


def handle(handler, context, rows_and_headers):
    set_requests(context, [headers for _, headers in rows_and_headers])
    return handler.handle([row for row, _ in rows_and_headers], context)


def json_row(**fields):
    """A JSON request as the worker hands it over with TorchServe's input decoding off: the client's bytes."""
    return ({"body": json.dumps(fields).encode()}, {"Content-Type": "application/json"})


def array_of(body: bytes) -> np.ndarray:
    return np.array(json.loads(body), dtype="uint8")


def png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def served_handler(handler_factory):
    return handler_factory({"max_batch_pixels": 4 * 768 * 768})


def test_initialize_loads_the_pipeline_in_place_without_copying_it(served_handler):
    handler, context = served_handler
    model_dir = Path(context.system_properties["model_dir"])
    assert handler.initialized
    assert Path(str(handler.engine.pipeline.config._name_or_path)) == model_dir / "pipeline"
    assert sorted(path.name for path in model_dir.iterdir()) == ["pipeline"]


def test_a_bad_request_fails_alone_in_its_batch(served_handler):
    handler, context = served_handler
    bodies = handle(handler, context, [
        json_row(prompt="a cat", seed=1, **SMALL),
        json_row(prompt="a cat", seed=1, width=770),
        ({"body": b"\xff\xfe"}, {}),
        json_row(prompt="a dog", seed=2, **SMALL),
    ])
    assert [context.get_response_status(i)[0] for i in range(4)] == [200, 400, 400, 200]
    error = json.loads(bodies[1])["error"]
    assert error["field"] == "width" and "770" in error["message"]
    assert "UTF-8" in json.loads(bodies[2])["error"]["message"]
    assert array_of(bodies[0]).shape == (64, 64, 3)
    assert not np.array_equal(array_of(bodies[0]), array_of(bodies[3]))


def test_same_seed_gives_the_same_image_alone_and_batched(served_handler):
    handler, context = served_handler
    alone = array_of(handle(handler, context, [json_row(prompt="a red fox", seed=7, **SMALL)])[0])
    batched = handle(handler, context, [
        json_row(prompt="a blue car", seed=3, **SMALL),
        json_row(prompt="a red fox", seed=7, **SMALL),
        json_row(prompt="a house", seed=9, **SMALL, negative_prompt="blurry"),
    ])
    together = array_of(batched[1])
    assert np.abs(alone.astype(int) - together.astype(int)).max() <= 2
    assert not np.array_equal(together, array_of(batched[0]))


def test_num_images_and_seeds_are_reported(served_handler):
    handler, context = served_handler
    body = handle(handler, context, [json_row(prompt="a cat", seed=11, num_images=2, output_format="json", **SMALL)])[0]
    reply = json.loads(body)
    assert reply["seeds"] == [11, 12]
    assert context.get_response_headers(0)["X-Seeds"] == "11,12"
    images = [np.array(Image.open(io.BytesIO(base64.b64decode(item)))) for item in reply["images"]]
    assert [image.shape for image in images] == [(64, 64, 3)] * 2
    assert not np.array_equal(images[0], images[1])
    assert reply["parameters"]["num_inference_steps"] == 2


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc",
                                       "lms", "heun"])
def test_every_scheduler_runs_without_touching_the_shared_one(served_handler, scheduler):
    handler, context = served_handler
    shared = handler.engine.pipeline.scheduler
    shared_config = dict(shared.config)
    body = handle(handler, context, [json_row(prompt="a cat", seed=1, scheduler=scheduler, **SMALL)])[0]
    assert context.get_response_status(0)[0] == 200, body
    assert array_of(body).shape == (64, 64, 3)
    assert handler.engine.pipeline.scheduler is shared and dict(shared.config) == shared_config


def test_schedulers_change_the_image(served_handler):
    handler, context = served_handler
    bodies = handle(handler, context, [json_row(prompt="a cat", seed=1, scheduler=name, **SMALL)
                                       for name in ("ddim", "euler_a")])
    assert not np.array_equal(array_of(bodies[0]), array_of(bodies[1]))


def test_image_to_image_and_inpainting_reuse_the_weights(served_handler):
    handler, context = served_handler
    source = np.full((64, 64, 3), 200, dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    bodies = handle(handler, context, [
        json_row(prompt="a cat", seed=1, num_inference_steps=4, image=png_base64(source), strength=0.5),
        json_row(prompt="a cat", seed=1, num_inference_steps=4, image=png_base64(source),
                 mask_image=png_base64(mask), strength=1.0),
        json_row(prompt="a cat", seed=1, num_inference_steps=4, width=64, height=64),
    ])
    assert [context.get_response_status(i)[0] for i in range(3)] == [200, 200, 200]
    image_to_image, inpainted, text_to_image = (array_of(body) for body in bodies)
    assert image_to_image.shape == inpainted.shape == (64, 64, 3)
    # A low strength keeps the source visible: closer to it than a text-to-image result is.
    assert np.abs(image_to_image.astype(int) - 200).mean() < np.abs(text_to_image.astype(int) - 200).mean()
    # Inpainting repaints only under the mask (the tiny model's VAE round trip blurs the edges a little).
    assert np.abs(inpainted[:8, :8].astype(int) - 200).mean() < np.abs(inpainted[24:40, 24:40].astype(int) - 200).mean()
    pipelines = handler.engine._task_pipelines
    assert pipelines["image-to-image"].arguments["unet"] is handler.engine.pipeline.unet
    assert pipelines["inpainting"].arguments["unet"] is handler.engine.pipeline.unet


def test_requests_over_the_batch_budget_are_split(handler_factory):
    handler, context = handler_factory({"max_batch_pixels": 2 * 64 * 64, "max_request_pixels": 2 * 64 * 64,
                                        "default_width": 64, "default_height": 64})
    bodies = handle(handler, context, [json_row(prompt="a cat", seed=i, output_format="json", **SMALL)
                                       for i in range(3)])
    sizes = [json.loads(body)["timings_ms"]["batch_images"] for body in bodies]
    assert sizes == [2, 2, 1]


def test_out_of_memory_is_a_507_and_the_worker_keeps_serving(served_handler, monkeypatch):
    # A real out-of-memory would take the test machine down with it; the pipeline call is made to raise
    # the exception torch raises, once, to check how the handler recovers.
    import torch

    handler, context = served_handler
    calls = []
    original = handler.engine._call_pipeline

    def fail_once(group, *watcher):
        calls.append(len(group))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(group, *watcher)

    monkeypatch.setattr(handler.engine, "_call_pipeline", fail_once)
    bodies = handle(handler, context, [json_row(prompt="a cat", seed=1, **SMALL),
                                       json_row(prompt="a cat", seed=1, num_inference_steps=3, width=64, height=64)])
    assert [context.get_response_status(i)[0] for i in range(2)] == [507, 200]
    assert json.loads(bodies[0])["error"]["reason"] == "out_of_memory"
    assert array_of(bodies[1]).shape == (64, 64, 3)


def test_a_request_that_breaks_a_shared_call_fails_alone(served_handler, monkeypatch):
    # No valid request breaks the tiny pipeline any more, so the pipeline call is made to fail whenever
    # the prompt "poison" is in it, to check that its batch neighbours are rerun and succeed.
    handler, context = served_handler
    original = handler.engine._call_pipeline

    def fail_on_poison(group, *watcher):
        if any(request.prompt == "poison" for request in group):
            raise TypeError("TextEncodeInput must be ...")
        return original(group, *watcher)

    monkeypatch.setattr(handler.engine, "_call_pipeline", fail_on_poison)
    bodies = handle(handler, context, [json_row(prompt="a cat", seed=1, **SMALL),
                                       json_row(prompt="poison", seed=1, **SMALL),
                                       json_row(prompt="a dog", seed=2, **SMALL)])
    assert [context.get_response_status(i)[0] for i in range(3)] == [200, 500, 200]
    assert json.loads(bodies[1])["error"]["reason"] == "internal_error"


def test_cpu_allocator_failures_count_as_out_of_memory():
    from handler.core.generation import _is_out_of_memory

    assert _is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB"))
    assert not _is_out_of_memory(RuntimeError("shapes cannot be multiplied"))


def test_the_operator_can_switch_the_safety_checker_off(tmp_path_factory):
    from conftest import make_context
    from handler.stable_diffusion_handler import StableDiffusionHandler
    from builder.tiny_pipeline import build_tiny_pipeline

    results = {}
    for enabled in (True, False):
        model_dir = tmp_path_factory.mktemp("safety")
        build_tiny_pipeline(model_dir / "pipeline", "sd1-safety")
        handler, context = StableDiffusionHandler(), make_context(model_dir, {"warmup": False,
                                                                              "safety_checker": enabled})
        handler.initialize(context)
        bodies = handle(handler, context, [json_row(prompt="a cat", seed=1, output_format="npy", **SMALL)])
        results[enabled] = (context.get_response_headers(0).get("X-NSFW"), np.load(io.BytesIO(bodies[0])))
        assert (handler.engine.pipeline.safety_checker is None) == (not enabled)
    assert results[True][0] == "true" and not results[True][1].any()
    assert results[False][0] is None and results[False][1].any()


def test_an_explanation_in_a_batch_gets_a_501_and_never_fails_its_neighbours(served_handler):
    handler, context = served_handler
    explain = ({"body": b"a cat"}, {"Content-Type": "text/plain", "explain": "True"})
    for position in (0, 2):  # sent first or last: TorchServe's own handle() looks only at request 0
        rows = [json_row(prompt="a cat", seed=1, **SMALL), json_row(prompt="a dog", seed=2, **SMALL)]
        rows.insert(position, explain)
        bodies = handle(handler, context, rows)
        statuses = [context.get_response_status(i)[0] for i in range(3)]
        assert statuses[position] == 501 and statuses.count(200) == 2
        assert json.loads(bodies[position])["error"]["reason"] == "not_implemented"


@pytest.mark.parametrize("output_format, content_type", [("array", "application/json"), ("png", "image/png"),
                                                         ("npy", "application/x-npy"), ("json", "application/json")])
def test_each_format_gets_its_content_type_and_the_seeds_header(served_handler, output_format, content_type):
    handler, context = served_handler
    handle(handler, context, [json_row(prompt="a cat", seed=5, output_format=output_format, **SMALL)])
    assert context.get_response_content_type(0) == content_type
    assert context.get_response_headers(0)["X-Seeds"] == "5"


def test_describe_gives_the_schema_and_capabilities_of_the_loaded_model(served_handler):
    handler, context = served_handler
    set_requests(context, [{"describe": "True"}])
    described = json.loads(handler.handle([{}], context)[0])
    schema, capabilities = described["request_schema"], described["capabilities"]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["width"]["multipleOf"] == capabilities["size_multiple"] == 8
    assert schema["properties"]["num_inference_steps"]["maximum"] == handler.settings.max_steps
    assert set(schema["properties"]["scheduler"]["enum"]) == set(capabilities["schedulers"])
    assert capabilities["tasks"] == ["text-to-image", "image-to-image", "inpainting"]
    assert capabilities["default_scheduler"] == "pndm" and capabilities["default_width"] == 768
    assert described["prompts"] == {"prompt_syntax": "plain", "translate": "never"}  # no translator packed


def test_an_image_that_comes_out_nan_is_a_counted_500_never_a_black_200(handler_factory, caplog):
    # A checkpoint with a corrupted token embedding: prompts with that token come out NaN, the others do not.
    import torch

    handler, context = handler_factory()
    pipeline = handler.engine.pipeline
    poisoned = pipeline.tokenizer("qqq", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        pipeline.text_encoder.get_input_embeddings().weight[poisoned] = float("nan")
    caplog.set_level("INFO", logger="ts.metrics.caching_metric")
    bodies = handle(handler, context, [json_row(prompt="a cat", seed=1, **SMALL),
                                       json_row(prompt="qqq", seed=1, **SMALL),
                                       json_row(prompt="a dog", seed=2, **SMALL, output_format="png")])
    assert [context.get_response_status(i)[0] for i in range(3)] == [200, 500, 200]
    error = json.loads(bodies[1])["error"]
    assert error["reason"] == "internal_error" and "NaN" in error["message"]
    assert array_of(bodies[0]).shape == (64, 64, 3)
    assert any("]RejectedRequests.Count:1|" in record.getMessage() and "Reason:internal_error" in
               record.getMessage() for record in caplog.records)  # the metrics line TorchServe reads
