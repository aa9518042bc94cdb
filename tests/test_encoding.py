"""Response encoding: the compact array JSON, and every output format's body and metadata."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from handler.core.contract import Contract
from handler.core.encoding import EXIF_IMAGE_DESCRIPTION, OUTPUT_FORMATS, PNG_JSON_KEY, array_json, encode_images
from handler.core.generation import GenerationResult
from handler.core.settings import HandlerSettings
from helpers import native_body

PROMPT = "a cat in Zürich, ☕"  # non-ASCII: the metadata must carry it through EXIF too
TIMINGS = {"pipeline": 123.4, "total": 130.0}


def random_images(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def smooth_images(shape) -> np.ndarray:
    """Gradients, different per channel and image: what lossy codecs keep close to the source."""
    count, height, width, _ = shape
    y, x = np.mgrid[0:height, 0:width]
    channels = [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) * 255 // (width + height)]
    image = np.stack(channels, axis=-1).astype(np.uint8)
    return np.stack([np.roll(image, index, axis=-1) for index in range(count)])


def parsed_request(num_images: int, output_format: str, **fields):
    body = {"prompt": PROMPT, "seed": 1234, "num_images": num_images, "output_format": output_format,
            "width": 72, "height": 64, "num_inference_steps": 3, **fields}
    return native_body(Contract(HandlerSettings()), body).generation


def encoded(request, images: np.ndarray, output_format: str) -> bytes:
    """The body for images made for ``request`` by the pipeline's default scheduler (pndm for SD 1)."""
    result = GenerationResult(request, images, TIMINGS, scheduler="pndm")
    return encode_images(images, output_format, list(request.seeds), result.parameters(), TIMINGS)


def encode(output_format: str, num_images: int = 1, smooth: bool = False):
    request = parsed_request(num_images, output_format)
    shape = (num_images, request.height, request.width, 3)
    images = smooth_images(shape) if smooth else random_images(shape, seed=num_images)
    return request, images, encoded(request, images, output_format)


# --- array_json ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 4), (2, 3, 3), (5, 4, 3), (2, 4, 5, 3), (1, 8, 8, 3),
                                   (3, 1, 1, 3)])
def test_array_json_matches_json_dumps(shape):
    array = random_images(shape, seed=sum(shape))
    assert array_json(array) == json.dumps(array.tolist(), separators=(",", ":")).encode()


def test_array_json_every_byte_value():
    array = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert array_json(array) == json.dumps(array.tolist(), separators=(",", ":")).encode()


def test_array_json_of_a_non_contiguous_view():
    array = random_images((6, 10, 3))[::2, ::-1, [2, 0, 1]]
    assert not array.flags.c_contiguous
    assert array_json(array) == json.dumps(array.tolist(), separators=(",", ":")).encode()


def test_upstream_client_round_trip():
    """TorchServe's upstream client reads the body with np.array(json.loads(body), dtype="uint8")."""
    images = random_images((2, 9, 11, 3))
    assert np.array_equal(np.array(json.loads(array_json(images)), dtype="uint8"), images)
    assert np.array_equal(np.array(json.loads(array_json(images[0])), dtype="uint8"), images[0])


@pytest.mark.parametrize("array", [np.zeros((2, 2), dtype=np.int64), np.zeros((2, 2), dtype=np.float32),
                                   np.array(7, dtype=np.uint8)], ids=["int64", "float32", "0-d"])
def test_array_json_refuses_other_arrays(array):
    with pytest.raises(ValueError):
        array_json(array)


# --- encode_images -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
def test_every_format_gives_a_body(output_format):
    _, _, body = encode(output_format)
    assert isinstance(body, bytes) and body


def metadata_is_the_request(metadata: str, request, seed: int):
    parsed = json.loads(metadata)
    assert parsed["seed"] == seed
    assert parsed["prompt"] == PROMPT
    assert parsed["width"] == request.width and parsed["height"] == request.height
    assert parsed["num_inference_steps"] == request.num_inference_steps
    assert parsed["scheduler"] == "pndm"  # the scheduler that ran, also when the request named none
    assert "seeds" not in parsed


def test_png_body_and_metadata():
    request, images, response = encode("png")
    picture = Image.open(io.BytesIO(response))
    assert picture.format == "PNG"
    assert np.array_equal(np.asarray(picture.convert("RGB")), images[0])
    metadata_is_the_request(picture.text[PNG_JSON_KEY], request, 1234)


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_lossy_body_and_exif_description(output_format):
    request, images, response = encode(output_format, smooth=True)
    picture = Image.open(io.BytesIO(response))
    assert picture.format == output_format.upper()
    assert picture.size == (request.width, request.height)
    # Lossy, but close to the source; a wrong axis order or channel order would be far off.
    decoded = np.asarray(picture.convert("RGB"), dtype=np.int16)
    assert np.abs(decoded - images[0]).mean() < 4
    assert np.abs(decoded - images[0][..., ::-1]).mean() > 20
    metadata_is_the_request(picture.getexif()[EXIF_IMAGE_DESCRIPTION], request, 1234)


@pytest.mark.parametrize("num_images", [1, 3])
def test_npy_loads_to_the_same_array(num_images):
    _, images, response = encode("npy", num_images)
    loaded = np.load(io.BytesIO(response), allow_pickle=False)
    assert loaded.dtype == np.uint8
    expected = images[0] if num_images == 1 else images
    assert loaded.shape == expected.shape
    assert np.array_equal(loaded, expected)


@pytest.mark.parametrize("num_images", [1, 3])
def test_array_shape(num_images):
    request, images, response = encode("array", num_images)
    loaded = np.array(json.loads(response), dtype="uint8")
    if num_images == 1:
        assert loaded.shape == (request.height, request.width, 3)
        assert np.array_equal(loaded, images[0])
    else:
        assert loaded.shape == (num_images, request.height, request.width, 3)
        assert np.array_equal(loaded, images)


@pytest.mark.parametrize("num_images", [1, 2])
def test_json_format(num_images):
    request, images, response = encode("json", num_images)
    document = json.loads(response)
    assert document["seeds"] == list(request.seeds)
    assert document["parameters"] == GenerationResult(request, images, scheduler="pndm").parameters()
    assert document["timings_ms"] == TIMINGS
    assert len(document["images"]) == num_images
    for image, text, seed in zip(images, document["images"], request.seeds):
        picture = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        assert picture.format == "PNG"
        assert np.array_equal(np.asarray(picture.convert("RGB")), image)
        metadata_is_the_request(picture.text[PNG_JSON_KEY], request, seed)


def test_image_to_image_metadata_carries_strength():
    request = native_body(Contract(HandlerSettings()), {
        "prompt": PROMPT, "seed": 9, "output_format": "png", "strength": 0.4,
        "image": base64.b64encode(png_of(random_images((64, 72, 3)))).decode()}).generation
    images = random_images((1, request.height, request.width, 3))
    response = encoded(request, images, "png")
    parsed = json.loads(Image.open(io.BytesIO(response)).text[PNG_JSON_KEY])
    assert parsed["task"] == "image-to-image"
    assert parsed["strength"] == 0.4
    assert parsed["seed"] == 9


def png_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
