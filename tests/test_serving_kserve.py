"""KServe v2 (Open Inference Protocol) and v1 through a real TorchServe, v2 driven by tritonclient's HTTP client.

tritonclient speaks the protocol as Triton and KServe servers do: binary tensors by default, JSON on request.
The native route's answer for the same seed is the reference (the same generation gives the same pixels).
"""

import base64
import io

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from helpers import MODEL, SMALL, json_images, npy, predict

pytestmark = pytest.mark.serving


def client_of(server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=server.inference_url.removeprefix("http://"), network_timeout=300)


def auth(server) -> dict:
    return server.inference_headers()


def inputs_of(prompt: str, seed: int, binary: bool = True) -> list:
    text, number = triton.InferInput("prompt", [1], "BYTES"), triton.InferInput("seed", [1], "INT64")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object), binary_data=binary)
    number.set_data_from_numpy(np.array([seed], dtype=np.int64), binary_data=binary)
    return [text, number]


@pytest.fixture(scope="module")
def reference(torchserve):
    return npy(predict(torchserve, {"prompt": "a red fox", "seed": 11, "output_format": "npy", **SMALL}))


def test_tritonclient_binary_defaults_give_the_native_image(torchserve, reference):
    result = client_of(torchserve).infer(MODEL, inputs_of("a red fox", 11), parameters=SMALL, request_id="r-1",
                                         headers=auth(torchserve))
    assert result.get_response()["id"] == "r-1" and result.get_response()["model_name"] == MODEL
    image = result.as_numpy("image")
    assert image.dtype == np.uint8 and image.shape == (1, 64, 64, 3)
    assert np.array_equal(image[0], reference) and result.as_numpy("seeds").tolist() == [11]


def test_json_tensors_and_png_files_as_bytes(torchserve):
    outputs = [triton.InferRequestedOutput("image", binary_data=False),
               triton.InferRequestedOutput("seeds", binary_data=False)]
    result = client_of(torchserve).infer(MODEL, inputs_of("a red fox", 11, binary=False), outputs=outputs,
                                         parameters={**SMALL, "num_images": 2, "output_format": "png"},
                                         headers=auth(torchserve))
    assert result.get_output("image")["datatype"] == "BYTES" and result.as_numpy("seeds").tolist() == [11, 12]
    files = [np.array(Image.open(io.BytesIO(base64.b64decode(item)))) for item in result.as_numpy("image")]
    # The native answer to the same two-image request is the reference: a pipeline call of two images may
    # differ from a call of one by a rounding step on some CPUs, so a one-image reference would not do.
    native = json_images(predict(torchserve, {"prompt": "a red fox", "seed": 11, "num_images": 2,
                                              "output_format": "json", **SMALL}).json())
    assert all(np.array_equal(file, image) for file, image in zip(files, native, strict=True))
    assert not np.array_equal(files[0], files[1])


def test_errors_reach_the_client_with_status_and_the_contracts_message(torchserve):
    with pytest.raises(InferenceServerException) as caught:
        client_of(torchserve).infer(MODEL, inputs_of("a cat", 1), parameters={**SMALL, "width": 770},
                                    headers=auth(torchserve))
    assert caught.value.status() == "400" and "770" in caught.value.message()
    wrong = triton.InferInput("seed", [1], "FP32")
    wrong.set_data_from_numpy(np.array([1.5], dtype=np.float32))
    with pytest.raises(InferenceServerException) as typed:
        client_of(torchserve).infer(MODEL, inputs_of("a cat", 1)[:1] + [wrong], headers=auth(torchserve))
    assert typed.value.status() == "400" and "INT64" in typed.value.message()


def test_v1_predictions_one_per_instance(torchserve, reference):
    response = requests.post(f"{torchserve.inference_url}/v1/models/{MODEL}:predict", headers=auth(torchserve),
                             json={"instances": [{"prompt": "a red fox", "seed": 11, **SMALL},
                                                 {"prompt": "a cat", **SMALL}]}, timeout=300)
    assert response.status_code == 200, response.text[:300]
    first, second = response.json()["predictions"]
    assert first["seed"] == 11 and isinstance(second["seed"], int)
    pixels = np.array(Image.open(io.BytesIO(base64.b64decode(first["image"]))))
    assert np.abs(pixels.astype(int) - reference).max() <= 1  # two rows of one call: CPU rounding may differ
    bad = requests.post(f"{torchserve.inference_url}/v1/models/{MODEL}:predict", headers=auth(torchserve),
                        json={"instances": [{"prompt": "a cat", "guidance_scale": 99}]}, timeout=300)
    assert bad.status_code == 400 and bad.json()["field"] == "instances[0].guidance_scale"
