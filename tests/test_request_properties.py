"""Any body, any JSON, any form, any headers, for every model family: the native protocol and the contract give a
valid typed request or a Rejection that is a 4xx with a short message.

Nothing else may escape the native protocol's ``read``: the handler turns any other exception into a 500 for that
request, so an escape here is a parser bug. Each family's contract is built from builder/families.py's facts
(size multiple, schedulers, negative prompts) and the default settings, with all three tasks; one more contract
offers text-to-image only, as a pipeline without image-to-image would.

Rows are what TorchServe hands the handler with TS_DECODE_INPUT_REQUEST=false: a JSON or text body as the
client's bytes under ``body``, a form as ``{name: bytes}``.
"""

import base64
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings, strategies as st
from PIL import Image

from handler.core.contract import FIELD_NAMES as CONTRACT_FIELD_NAMES, Contract
from handler.core.fields import Boolean, Choice, Integer, Number, Text
from handler.core.requests import MAX_SEED
from handler.core.encoding import OUTPUT_FORMATS, SINGLE_IMAGE_FORMATS
from handler.core.failures import Rejection
from handler.core.schedulers import SCHEDULERS  # every name, valid or not for a family
from handler.core.settings import HandlerSettings
from handler.protocols.http import status_of
from handler.protocols import native
from handler.protocols.native import NativeRequest, error_body
from helpers import family_contracts, png_bytes, read_native, solid

CONTRACTS = family_contracts(HandlerSettings())
every_contract = pytest.mark.parametrize("contract", list(CONTRACTS.values()), ids=list(CONTRACTS))
FIELD_NAMES = CONTRACT_FIELD_NAMES + tuple(spec.name for spec in native.FIELDS)  # what the native API reads
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_MESSAGE = 1024  # a rejection's message must stay short whatever the client sent


def _encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def _declared_size_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and whose pixel data is a few bytes (an image bomb)."""
    return _encoded(Image.new("1", (width, height)), "PNG")


SMALL_PNG = png_bytes(solid(80, 72))
IMAGE_FILES = [SMALL_PNG, png_bytes(solid(64, 64, 255, mode="L")), _encoded(Image.fromarray(solid(96, 64)), "JPEG"),
               _encoded(Image.fromarray(solid(64, 80)), "WEBP"), _encoded(Image.new("RGBA", (64, 64)), "PNG"),
               _encoded(Image.new("I;16", (64, 64), 40000), "PNG"), png_bytes(solid(1, 1)),
               _declared_size_png(5000, 4000)]
VALID_IMAGE_VALUES = [base64.b64encode(data).decode() for data in IMAGE_FILES] + [
    "data:image/png;base64," + base64.b64encode(SMALL_PNG).decode(),
    base64.encodebytes(SMALL_PNG).decode(),  # line-wrapped, as `base64 file.png` writes it
]
BAD_IMAGE_VALUES = [base64.b64encode(SMALL_PNG).decode()[:40], "data:,", "bm90IGFuIGltYWdl", "@@@", "",
                    "data:image/png;base64," + "A" * 100_000]

# --- Strategies ----------------------------------------------------------------------------------------------

# Integers json.dumps can write (Python refuses to print over 4300 digits); json_edge_texts sends longer ones.
integers = st.integers(-(2**80), 2**80) | st.integers(min_value=-(10**4000), max_value=10**4000)
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


sides = st.integers(4, 64).map(lambda n: n * 16) | st.integers(8, 128).map(lambda n: n * 8)
# Per field: valid values for some family (mostly), values just outside the contract, or any JSON value.
VALID = {
    "prompt": st.text(min_size=1, max_size=40).filter(str.strip) | st.just("a cat"),
    "negative_prompt": st.text(max_size=40),
    "num_inference_steps": st.integers(1, 150),
    "guidance_scale": st.floats(0, 30) | st.integers(0, 30),
    "width": sides,
    "height": sides,
    "seed": st.integers(0, MAX_SEED),
    "num_images": st.integers(1, 4),
    "scheduler": st.sampled_from(list(SCHEDULERS)),
    "output_format": st.sampled_from(OUTPUT_FORMATS),
    "image": st.sampled_from(VALID_IMAGE_VALUES),
    "mask_image": st.sampled_from(VALID_IMAGE_VALUES),
    "strength": st.floats(0, 1, exclude_min=True) | st.just(1),
    "stream": st.booleans(),
    "preview_every": st.integers(1, 150),
    "timeout_seconds": st.floats(0, 300, exclude_min=True) | st.just(1),
}
EDGES = {
    "prompt": st.sampled_from(["", " ", "\u3000", "a\x00b", "x" * 2001, "x" * 100_000, "\ud800"]),
    "negative_prompt": st.sampled_from(["\x00", "y" * 2001, "\udfff"]),
    "num_inference_steps": st.sampled_from([0, 151, "20", 20.0, 20.5, 10**4000]),
    "guidance_scale": st.sampled_from([-0.1, 30.01, "7", float("nan"), float("inf")]),
    "width": st.sampled_from([0, 56, 72, 770, 1032, "512", 10**20]),
    "height": st.sampled_from([0, 56, 88, 770, 1032, 512.0]),
    "seed": st.sampled_from([-1, 2**63, 1.5]),
    "num_images": st.sampled_from([0, 5, "2"]),
    "scheduler": st.sampled_from(["k_lms", "", "EULER", "x" * 10_000]),
    "output_format": st.sampled_from(["gif", "", "PNG"]),
    "image": st.sampled_from(BAD_IMAGE_VALUES),
    "mask_image": st.sampled_from(BAD_IMAGE_VALUES),
    "strength": st.sampled_from([0, 1.01, -0.5, 1e-9]),
    "stream": st.sampled_from([0, 1, "true", "yes", None]),
    "preview_every": st.sampled_from([0, -1, 151, 2.5]),
    "timeout_seconds": st.sampled_from([0, -1, 301, 1e-300, "10"]),
}


def declared_values(spec) -> st.SearchStrategy:
    """Values of a field's declared type, for a field added to FIELDS after these strategies were written."""
    kind = spec.type
    if isinstance(kind, Choice) and kind.choices:  # a choice of capabilities this model lacks has none
        return st.sampled_from(list(kind.choices))
    if isinstance(kind, Boolean):
        return st.booleans()
    if isinstance(kind, Integer):
        return st.integers(kind.minimum, kind.maximum).filter(lambda number: number % kind.multiple_of == 0)
    if isinstance(kind, Number):
        return st.floats(kind.minimum, kind.maximum, exclude_min=kind.exclusive_minimum)
    if isinstance(kind, Text):
        return st.text(min_size=1, max_size=40)
    return json_values


DECLARED = {**CONTRACTS["sd1"].declared, **CONTRACTS["sd1"].bind(native.FIELDS)}  # what the native API reads
field_values = {name: weighted((4, VALID.get(name, declared_values(DECLARED[name]))),
                               (1, EDGES.get(name, json_values)), (1, json_values)) for name in FIELD_NAMES}
optional_fields = {name: strategy for name, strategy in field_values.items() if name != "prompt"}
unknown_names = st.text(max_size=12).filter(lambda key: key not in FIELD_NAMES) | st.just("k" * 50_000)
unknown_fields = st.dictionaries(unknown_names, json_values, max_size=1) | st.just(
    {f"extra{number}": number for number in range(500)})


def with_unknown(body: dict, extra: dict) -> dict:
    return {**extra, **body}


# Objects of the request's fields (the prompt usually there, any other field maybe), sometimes plus unknowns.
bodies_as_dicts = st.builds(
    with_unknown,
    weighted((4, st.fixed_dictionaries({"prompt": field_values["prompt"]}, optional=optional_fields)),
             (1, st.fixed_dictionaries({}, optional=optional_fields))),
    weighted((3, st.just({})), (1, unknown_fields)),
)

# JSON texts with what a byte-level fuzzer will not stumble on: long number literals, deep nesting, repeated keys.
json_edge_texts = st.builds(
    lambda digits, depth: b'{"prompt": "a", "seed": ' + b"[" * depth + b"9" * digits + b"]" * depth + b"}",
    st.integers(1, 6000), st.integers(0, 3000),
) | st.sampled_from([b'{"prompt": "a", "prompt": "b"}', b'{"prompt": "a", "seed": NaN}', b'{"prompt": "a"} x'])
byte_bodies = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=60).map(str.encode),
    json_values.map(lambda value: json.dumps(value).encode()),
    bodies_as_dicts.map(lambda value: json.dumps(value).encode()),
    json_edge_texts,
)

CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain", "TEXT/PLAIN;charset=utf-8",
                 "application/vnd.api+json", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "image/png", "application/octet-stream", "", ";", "x" * 100_000]
ACCEPTS = ["application/json", "application/x-ndjson", "image/png;q=0.1, application/x-ndjson;q=0", "image/png", "image/jpeg, image/webp", "application/x-npy", "*/*", "image/*;q=0",
           "image/png;q=0.5, application/json;q=0.9", "text/html", "", "image/png;q=x", "a/" + "b" * 100_000]
header_names = st.sampled_from(["Content-Type", "content-type", "Accept", "accept", "ACCEPT"]) | st.text(max_size=12)
header_values = st.sampled_from(CONTENT_TYPES + ACCEPTS) | st.text(max_size=40) | st.binary(max_size=20)
headers = st.dictionaries(header_names, header_values, max_size=4).map(
    # TorchServe also puts each parameter's own content type among the headers, as a dict.
    lambda found: {"body": {"content-type": "application/json"}, **found}
)

# Form rows: TorchServe hands each field's raw bytes; an uploaded image arrives as the file's bytes.
form_field_values = {
    name: weighted((4, values.map(lambda value: str(value).encode("utf-8", "surrogatepass"))), (1, st.binary(max_size=40)),
                   (1, st.text(max_size=20)))
    for name, values in field_values.items()
}
for image_field in ("image", "mask_image"):
    form_field_values[image_field] = weighted((2, form_field_values[image_field]), (2, st.sampled_from(IMAGE_FILES)),
                                              (1, st.just(b"")))
optional_form_fields = {name: strategy for name, strategy in form_field_values.items() if name != "prompt"}
form_rows = st.builds(
    with_unknown,
    weighted((4, st.fixed_dictionaries({"prompt": form_field_values["prompt"]}, optional=optional_form_fields)),
             (1, st.fixed_dictionaries({}, optional=optional_form_fields))),
    weighted((3, st.just({})), (1, st.dictionaries(
        st.text(max_size=12).filter(lambda key: key not in FIELD_NAMES), st.binary(max_size=20), max_size=1))),
)
form_types = st.sampled_from(["application/x-www-form-urlencoded", "multipart/form-data; boundary=----x"])


def declaring(request_headers: dict, content_type: str) -> dict:
    """The headers with their Content-Type (whatever its case) replaced by ``content_type``."""
    kept = {name: value for name, value in request_headers.items() if name.lower() != "content-type"}
    return {**kept, "Content-Type": content_type}


# --- The property --------------------------------------------------------------------------------------------


def check(contract: Contract, row: dict, request_headers: dict) -> None:
    """Read one row as the handler does; a result must be a usable request, a rejection a short 4xx."""
    try:
        result = read_native(contract, row, request_headers)
    except Rejection as rejection:
        check_rejection(rejection)
        return
    check_request(contract, result)


def check_rejection(rejection: Rejection) -> None:
    status = status_of(rejection)
    event(f"{status} {rejection.reason}")
    assert 400 <= status < 500, rejection
    assert isinstance(rejection.message, str) and rejection.message.strip()
    assert len(rejection.message) < MAX_MESSAGE, rejection.message[:200]
    assert rejection.field is None or (isinstance(rejection.field, str) and len(rejection.field) <= 100)
    error = json.loads(error_body(rejection))["error"]
    assert error["code"] == status and error["reason"] == rejection.reason


def check_request(contract: Contract, result: NativeRequest) -> None:
    from handler.core.generation import GenerationResult

    settings, capabilities = contract.settings, contract.capabilities
    assert isinstance(result, NativeRequest)
    request = result.generation
    event(f"valid {request.task} request")
    assert request.task in capabilities.tasks
    assert isinstance(request.prompt, str) and request.prompt.strip()
    assert len(request.prompt) <= settings.max_prompt_length
    if not capabilities.negative_prompt:
        assert request.negative_prompt is None
    for side in (request.width, request.height):
        assert type(side) is int and side % capabilities.size_multiple == 0
        assert settings.min_side <= side <= settings.max_side
    assert request.width * request.height <= settings.max_pixels
    assert 1 <= request.num_images <= settings.max_images
    assert request.pixels <= settings.max_request_pixels
    assert all(type(seed) is int and 0 <= seed <= MAX_SEED for seed in request.seeds)
    assert type(request.num_inference_steps) is int and 1 <= request.num_inference_steps <= settings.max_steps
    assert type(request.guidance_scale) is float and 0 <= request.guidance_scale <= settings.max_guidance_scale
    assert request.scheduler is None or request.scheduler in capabilities.schedulers
    assert result.output_format in OUTPUT_FORMATS
    if result.stream:  # a stream carries each image as a file
        assert result.output_format in SINGLE_IMAGE_FORMATS
    elif result.output_format in SINGLE_IMAGE_FORMATS:
        assert request.num_images == 1
    assert type(request.preview_every) is int and 0 <= request.preview_every <= settings.max_steps
    assert type(request.timeout_seconds) is float and 0 < request.timeout_seconds <= settings.max_generation_seconds
    if request.image is None:
        assert request.strength is None and request.mask_image is None
    else:
        assert request.image.size == (request.width, request.height) and request.image.mode == "RGB"
        assert 0 < request.strength <= 1 and int(request.num_inference_steps * request.strength) >= 1
    if request.mask_image is not None:
        assert request.mask_image.size == (request.width, request.height) and request.mask_image.mode == "L"
    hash(request.batch_key())
    # What the response metadata will carry must be strict JSON.
    images = np.zeros((request.num_images, 1, 1, 3), dtype=np.uint8)
    json.dumps(GenerationResult(request, images, scheduler="x").parameters(), allow_nan=False)


@every_contract
@PROPERTY_SETTINGS
@given(body=byte_bodies, request_headers=headers)
@example(body=b'{"prompt": "a", "seed": ' + b"1" * 5000 + b"}", request_headers={"Content-Type": "application/json"})
@example(body=b'{"prompt": "a", "seed": ' + b"[" * 3000 + b"]" * 3000 + b"}", request_headers={})
@example(body=b"x" * 1_000_000, request_headers={"Content-Type": "application/json"})
def test_any_bytes_body(contract, body, request_headers):
    check(contract, {"body": body}, request_headers)


@every_contract
@PROPERTY_SETTINGS
@given(value=json_values, request_headers=headers)
def test_any_json_document(contract, value, request_headers):
    encoded = json.dumps(value).encode()
    check(contract, {"body": encoded}, declaring(request_headers, "application/json"))
    check(contract, {"body": encoded}, request_headers)


@every_contract
@PROPERTY_SETTINGS
@given(body=bodies_as_dicts, request_headers=headers)
@example(body={"prompt": "a", "guidance_scale": 10**400}, request_headers={})
@example(body={"prompt": "a", "k" * 1_000_000: 1}, request_headers={})
@example(body={"prompt": "p" * 1_000_000, "negative_prompt": "n" * 1_000_000}, request_headers={})
def test_any_json_object(contract, body, request_headers):
    check(contract, {"body": json.dumps(body).encode()}, declaring(request_headers, "application/json"))


@every_contract
@PROPERTY_SETTINGS
@given(row=form_rows, form_type=form_types, request_headers=headers)
@example(row={"prompt": b"a", "width": b"9" * 100_000}, form_type="application/x-www-form-urlencoded",
         request_headers={})
def test_any_form_row(contract, row, form_type, request_headers):
    check(contract, row, declaring(request_headers, form_type))


@every_contract
@PROPERTY_SETTINGS
@given(prompt=st.text(max_size=300) | st.just("z" * 100_000), request_headers=headers)
def test_any_text_body(contract, prompt, request_headers):
    check(contract, {"body": prompt.encode("utf-8", "surrogatepass")}, declaring(request_headers, "text/plain"))
