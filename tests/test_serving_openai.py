"""The OpenAI Images API door through a real TorchServe, driven by the official ``openai`` SDK.

The SDK talks to ``/predictions/stable_diffusion/1.0/v1`` with the inference key as its API key; the native
route's answers for the same seeds are the reference (a PNG is lossless, so the same generation gives the same
pixels through both doors).
"""

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from PIL import Image

from helpers import (
    MODEL, batches_in, error_of, json_images, log_offset, log_since, png_base64, predict, shipped_settings,
)

pytestmark = pytest.mark.serving

STEPS = {"num_inference_steps": 2}
MAX_ROUNDS = 6


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.inference_url}/predictions/{MODEL}/1.0/v1",
                         api_key=server.keys()["inference"]["key"], max_retries=0, timeout=300)


def pixels(b64_json: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64_json))))


def png_file(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_generate_two_images_with_their_seeds(torchserve):
    raw = client_of(torchserve).images.with_raw_response.generate(
        prompt="a red fox", n=2, size="64x64", extra_body={"seed": 5, **STEPS})
    assert raw.headers["X-Seeds"] == "5,6"
    result = raw.parse()
    assert isinstance(result.created, int) and result.output_format == "png" and result.size == "64x64"
    images = [pixels(image.b64_json) for image in result.data]
    assert [image.shape for image in images] == [(64, 64, 3)] * 2 and not np.array_equal(*images)
    assert [image.revised_prompt for image in result.data] == ["a red fox"] * 2
    assert all(image.url is None for image in result.data)

    native = predict(torchserve, {"prompt": "a red fox", "seed": 5, "num_images": 2, "width": 64, "height": 64,
                                  "output_format": "json", **STEPS})
    assert native.status_code == 200, native.text[:300]
    assert all(np.array_equal(a, b) for a, b in zip(images, json_images(native.json())))


def test_edit_with_an_openai_mask_is_the_native_inpainting_with_the_white_mask(torchserve):
    source = np.zeros((64, 64, 3), dtype=np.uint8)
    source[:, :32] = 220
    openai_mask = np.full((64, 64, 4), 255, dtype=np.uint8)
    openai_mask[16:48, 16:48, 3] = 0  # transparent: edit here
    result = client_of(torchserve).images.edit(
        image=("photo.png", png_file(source), "image/png"), mask=("mask.png", png_file(openai_mask), "image/png"),
        prompt="a cat", size="64x64", output_format="png", extra_body={"seed": 9, "strength": 1.0, **STEPS})
    (image,) = result.data
    edited = Image.open(io.BytesIO(base64.b64decode(image.b64_json)))
    assert edited.size == (64, 64) and json.loads(edited.text["generation"])["task"] == "inpainting"

    white_mask = np.zeros((64, 64), dtype=np.uint8)
    white_mask[16:48, 16:48] = 255
    body = {"prompt": "a cat", "seed": 9, "strength": 1.0, "width": 64, "height": 64, "output_format": "json",
            "image": png_base64(source), **STEPS}
    native, inverted = (predict(torchserve, {**body, "mask_image": png_base64(mask)})
                        for mask in (white_mask, 255 - white_mask))
    assert native.status_code == inverted.status_code == 200, (native.text[:300], inverted.text[:300])
    assert np.array_equal(np.array(edited), json_images(native.json())[0])
    assert not np.array_equal(np.array(edited), json_images(inverted.json())[0])


def test_errors_are_openai_errors_with_the_contracts_message(torchserve):
    from handler.core.contract import Contract
    from handler.core.failures import Rejection

    client = client_of(torchserve)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a cat", n=5, size="64x64", extra_body=STEPS)
    with pytest.raises(Rejection) as contract_says:
        Contract(shipped_settings()).parse({"prompt": "a cat", "num_images": 5})
    error = caught.value
    assert error.status_code == 400 and error.param == "n" and error.code == "invalid_field"
    assert error.type == "invalid_request_error"
    assert error.body["message"].startswith(contract_says.value.message), error.body

    with pytest.raises(openai.BadRequestError) as url:
        client.images.generate(prompt="a cat", response_format="url")
    assert url.value.param == "response_format" and "does not store files" in url.value.body["message"]
    with pytest.raises(openai.BadRequestError) as size:
        client.images.generate(prompt="a cat", size="770x512")
    assert size.value.param == "size" and "770" in size.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.images.create_variation(image=("photo.png", png_file(np.zeros((64, 64, 3), np.uint8)), "image/png"))


def test_models_lists_the_served_model(torchserve):
    client = client_of(torchserve)
    assert [model.id for model in client.models.list()] == [MODEL]
    model = client.models.retrieve(MODEL)
    assert model.object == "model" and model.owned_by == "torchserve" and model.created > 1_600_000_000
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("dall-e-3")
    assert caught.value.code == "model_not_found"


def test_sdk_calls_and_native_calls_in_one_batch_are_each_answered_in_their_own_shape(batched_server):
    client = client_of(batched_server)
    native_body = {"prompt": "a dog", "width": 64, "height": 64, "output_format": "json", "num_inference_steps": 3}
    calls = [
        lambda: client.images.with_raw_response.generate(prompt="a cat", size="64x64",
                                                         extra_body={"seed": 1, "num_inference_steps": 3}),
        lambda: client.images.generate(prompt="a cat", n=9, size="64x64", extra_body={"num_inference_steps": 3}),
        lambda: predict(batched_server, {**native_body, "seed": 3}),
        lambda: predict(batched_server, {**native_body, "seed": 4, "width": 72}),  # never in the others' call
    ]

    def attempt(call):
        try:
            return call()
        except openai.APIError as error:
            return error

    offset = log_offset(batched_server)
    shared = None
    for _ in range(MAX_ROUNDS):
        with ThreadPoolExecutor(len(calls)) as pool:
            sdk, refused, native, other = pool.map(attempt, calls)
        assert sdk.headers["X-Seeds"] == "1", sdk.headers
        (image,) = sdk.parse().data
        assert pixels(image.b64_json).shape == (64, 64, 3)
        assert isinstance(refused, openai.BadRequestError) and refused.param == "n", refused
        assert native.status_code == other.status_code == 200, (native.text[:200], other.text[:200])
        assert native.json()["seeds"] == [3] and other.json()["timings_ms"]["batch_images"] == 1
        assert json_images(other.json())[0].shape == (64, 72, 3)
        if native.json()["timings_ms"]["batch_images"] == 2:  # the SDK's image and the native one: one call
            shared = pixels(image.b64_json)
            break
    assert shared is not None, f"the SDK and native requests never shared a pipeline call in {MAX_ROUNDS} rounds"
    assert any(batch.size >= 3 for batch in batches_in(log_since(batched_server, offset)))

    alone = predict(batched_server, {**native_body, "prompt": "a cat", "seed": 1})
    assert alone.status_code == 200 and alone.json()["timings_ms"]["batch_images"] == 1
    assert np.abs(json_images(alone.json())[0].astype(int) - shared.astype(int)).max() <= 2
    assert error_of(predict(batched_server, {"prompt": "a cat", "n": 2}))["reason"] == "unknown_field"
