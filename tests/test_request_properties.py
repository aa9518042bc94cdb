"""Any body, any JSON, any headers: the parser returns a valid typed request or a 4xx with a message.

Nothing else may escape it: an exception other than RequestError would fail every request of the batch.
"""

import base64
import io
import json

import numpy as np
from hypothesis import HealthCheck, event, example, given, settings, strategies as st
from PIL import Image

from handler.core.failures import RequestError
from handler.core.contract import FIELD_NAMES, GenerationRequest, RequestParser
from handler.core.schedulers import SCHEDULERS  # every name, valid or not for the model
from handler.core.settings import OUTPUT_FORMATS, HandlerSettings

SETTINGS = HandlerSettings()
PARSER = RequestParser(SETTINGS)
PROPERTY_SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _small_png_base64() -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full((72, 80, 3), 128, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


SMALL_PNG = _small_png_base64()
IMAGE_VALUES = [SMALL_PNG, "data:image/png;base64," + SMALL_PNG, SMALL_PNG[:40], "data:,", "bm90IGFuIGltYWdl"]

# --- Strategies ----------------------------------------------------------------------------------------------

# TorchServe's json.loads limits integers to 4300 digits, so no decoded body holds a longer one.
integers = st.integers() | st.integers(min_value=-(10**400), max_value=10**400)
edge_numbers = st.sampled_from([0, -1, 0.5, 1.0, -0.0, 5e-324, 1e308, 2**63, 10**309, -(10**309), 2**1024])
json_scalars = st.none() | st.booleans() | integers | st.floats() | edge_numbers | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def weighted(*choices):
    """Draw from one of the (weight, strategy) choices, in proportion to the weights."""
    options = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(options) - 1).flatmap(lambda index: options[index])


# Per field: valid values (mostly), values just outside the contract, or any JSON value at all.
VALID = {
    "prompt": st.text(min_size=1, max_size=40).filter(str.strip) | st.just("a cat"),
    "negative_prompt": st.text(max_size=40),
    "num_inference_steps": st.integers(1, 150),
    "guidance_scale": st.floats(0, 30) | st.integers(0, 30),
    "width": st.integers(8, 128).map(lambda n: n * 8),
    "height": st.integers(8, 128).map(lambda n: n * 8),
    "seed": st.integers(0, 2**63 - 1),
    "num_images": st.integers(1, 4),
    "scheduler": st.sampled_from(list(SCHEDULERS) + ["EULER"]),
    "output_format": st.sampled_from(list(OUTPUT_FORMATS) + ["PNG"]),
    "image": st.sampled_from(IMAGE_VALUES[:2]),
    "mask_image": st.sampled_from(IMAGE_VALUES[:2]),
    "strength": st.floats(0, 1, exclude_min=True) | st.just(1),
}
EDGES = {
    "prompt": st.sampled_from(["", " ", "a\x00b", "x" * 2001]),
    "negative_prompt": st.sampled_from(["\x00", "y" * 2001]),
    "num_inference_steps": st.sampled_from([0, 151, "20", 20.0, 20.5]),
    "guidance_scale": st.sampled_from([-0.1, 30.01, "7"]),
    "width": st.sampled_from([0, 56, 770, 1032, "512"]),
    "height": st.sampled_from([0, 56, 770, 1032, 512.0]),
    "seed": st.sampled_from([-1, 2**63, 1.5]),
    "num_images": st.sampled_from([0, 5, "2"]),
    "scheduler": st.sampled_from(["k_lms", ""]),
    "output_format": st.sampled_from(["gif", ""]),
    "image": st.sampled_from(IMAGE_VALUES[2:] + [""]),
    "mask_image": st.sampled_from(IMAGE_VALUES[2:] + [""]),
    "strength": st.sampled_from([0, 1.01, -0.5]),
}
field_values = {name: weighted((4, VALID[name]), (1, EDGES[name]), (1, json_values)) for name in FIELD_NAMES}
optional_fields = {name: strategy for name, strategy in field_values.items() if name != "prompt"}
unknown_fields = st.dictionaries(st.text(max_size=12).filter(lambda key: key not in FIELD_NAMES), json_values,
                                 max_size=1)


def with_unknown(body: dict, extra: dict) -> dict:
    return {**extra, **body}


# Objects of the request's fields (the prompt usually there, any other field maybe), sometimes plus one unknown.
bodies_as_dicts = st.builds(
    with_unknown,
    weighted((4, st.fixed_dictionaries({"prompt": field_values["prompt"]}, optional=optional_fields)),
             (1, st.fixed_dictionaries({}, optional=optional_fields))),
    weighted((3, st.just({})), (1, unknown_fields)),
)

# JSON texts with what a byte-level fuzzer will not stumble on: long number literals and deep nesting.
json_edge_texts = st.builds(
    lambda digits, depth: b'{"prompt": "a", "seed": ' + b"[" * depth + b"9" * digits + b"]" * depth + b"}",
    st.integers(1, 6000), st.integers(0, 3000),
)
byte_bodies = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=60).map(str.encode),
    json_values.map(lambda value: json.dumps(value).encode()),
    bodies_as_dicts.map(lambda value: json.dumps(value).encode()),
    json_edge_texts,
)

header_names = st.sampled_from(["Content-Type", "content-type", "Accept", "accept", "ACCEPT"]) | st.text(max_size=12)
header_values = st.sampled_from(
    ["application/json", "text/plain", "image/png", "image/jpeg, image/webp", "application/x-npy", "*/*", ""]
) | st.text(max_size=40)
headers = st.dictionaries(header_names, header_values, max_size=4).map(
    # TorchServe also puts each parameter's own content type among the headers, as a dict.
    lambda found: {"body": {"content-type": "application/json"}, **found}
)

# Form rows: TorchServe gives each field's raw bytes (or text, for text/* parts).
form_field_values = {
    name: weighted((4, values.map(lambda value: str(value).encode())), (1, st.binary(max_size=40)),
                   (1, st.text(max_size=20)))
    for name, values in field_values.items()
}
optional_form_fields = {name: strategy for name, strategy in form_field_values.items() if name != "prompt"}
form_rows = st.builds(
    with_unknown,
    weighted((4, st.fixed_dictionaries({"prompt": form_field_values["prompt"]}, optional=optional_form_fields)),
             (1, st.fixed_dictionaries({}, optional=optional_form_fields))),
    weighted((3, st.just({})), (1, st.dictionaries(
        st.text(max_size=12).filter(lambda key: key not in FIELD_NAMES + ("body", "data")), st.binary(max_size=20),
        max_size=1))),
)


def declaring_json(request_headers: dict) -> dict:
    """The headers with their Content-Type (whatever its case) replaced by application/json."""
    kept = {name: value for name, value in request_headers.items() if name.lower() != "content-type"}
    return {**kept, "Content-Type": "application/json"}


# --- The property --------------------------------------------------------------------------------------------


def check(row, request_headers):
    """Parse; a result must be a usable request, an error a 4xx with a message."""
    try:
        result = PARSER.parse(row, request_headers)
    except RequestError as error:
        event(f"RequestError {error.status} {error.reason}")
        assert 400 <= error.status < 500, error
        assert isinstance(error.message, str) and error.message.strip()
        json.loads(error.to_json())
        return
    assert isinstance(result, GenerationRequest)
    event(f"valid {result.task} request")
    assert isinstance(result.prompt, str) and result.prompt.strip()
    assert len(result.prompt) <= SETTINGS.max_prompt_length
    for side in (result.width, result.height):
        assert type(side) is int and side % 8 == 0 and SETTINGS.min_side <= side <= SETTINGS.max_side
    assert result.width * result.height <= SETTINGS.max_pixels
    assert 1 <= result.num_images <= SETTINGS.max_images
    assert result.pixels <= SETTINGS.max_request_pixels
    assert all(type(seed) is int and 0 <= seed < 2**63 for seed in result.seeds)
    assert type(result.num_inference_steps) is int and 1 <= result.num_inference_steps <= SETTINGS.max_steps
    assert type(result.guidance_scale) is float and 0 <= result.guidance_scale <= 30
    assert result.output_format in OUTPUT_FORMATS
    if result.image is not None:
        assert result.image.size == (result.width, result.height)
        assert 0 < result.strength <= 1
    json.dumps(result.parameters())  # what the response metadata carries must be serialisable


@PROPERTY_SETTINGS
@given(body=byte_bodies, request_headers=headers)
@example(body=b'{"prompt": "a", "seed": ' + b"1" * 5000 + b"}", request_headers={"Content-Type": "application/json"})
@example(body=b'{"prompt": "a", "seed": ' + b"[" * 3000 + b"]" * 3000 + b"}", request_headers={})
def test_any_bytes_body(body, request_headers):
    check({"body": body}, request_headers)


@PROPERTY_SETTINGS
@given(value=json_values, request_headers=headers)
def test_any_json_document_as_bytes(value, request_headers):
    encoded = json.dumps(value).encode()
    check({"body": encoded}, declaring_json(request_headers))
    check({"body": encoded.decode()}, request_headers)


@PROPERTY_SETTINGS
@given(body=bodies_as_dicts, request_headers=headers)
@example(body={"prompt": "a", "guidance_scale": 10**400}, request_headers={})
def test_any_decoded_json_object(body, request_headers):
    check({"body": body}, request_headers)
    check({"body": json.dumps(body).encode()}, declaring_json(request_headers))


@PROPERTY_SETTINGS
@given(value=json_values)
def test_any_decoded_json_value(value):
    check({"body": value}, {})


@PROPERTY_SETTINGS
@given(row=form_rows, request_headers=headers)
def test_any_form_row(row, request_headers):
    check(row, request_headers)
