"""Generated hostile bodies (Hypothesis) for the KServe v2 reader and the form readers (native and OpenAI edits),
in-process on the protocols' own ``read_call``: whatever a client sends is a typed call or a 4xx Rejection,
never the internal error (500) that an exception escaping a reader becomes. tests/test_serving_hostile.py sends
a handful of these bodies through a real TorchServe."""

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from handler.core.contract import FIELD_NAMES, Contract
from handler.core.failures import INTERNAL_ERROR
from handler.core.settings import HandlerSettings
from handler.protocols import kserve, native, openai
from handler.protocols.http import REPEATED_HEADER, HttpRequest, ServedModel, status_of
from helpers import png_bytes, solid

CONTRACT = Contract(HandlerSettings())
MODEL = ServedModel("stable_diffusion", "1.0")
KSERVE, NATIVE, OPENAI = (protocol(CONTRACT, MODEL) for protocol in
                          (kserve.KServeProtocol, native.NativeProtocol, openai.OpenAIProtocol))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DATATYPES = [*kserve.NUMPY_TYPE, "BYTES", "STRING", "FP8"]

scalars = st.none() | st.booleans() | st.integers(min_value=-10 ** 400, max_value=10 ** 400) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)
names = st.sampled_from([*FIELD_NAMES, "id", "x", ""]) | st.text(max_size=8)
deep_text = st.integers(min_value=1, max_value=3000).map(lambda depth: "[" * depth + "]" * (depth % 2))


@st.composite
def tensors(draw):
    tensor = {"name": draw(names), "datatype": draw(st.sampled_from(DATATYPES) | json_values),
              "shape": draw(st.sampled_from([[1], [1, 1], [], [2], [0]]) | json_values),
              "data": draw(st.lists(json_values | deep_text, max_size=2) | json_values)}
    if draw(st.booleans()):
        tensor["parameters"] = draw(st.dictionaries(st.sampled_from(["binary_data_size", "x"]), json_values,
                                                    max_size=2) | json_values)
    return {key: value for key, value in tensor.items() if draw(st.integers(0, 9))}  # now and then a key is left out


@st.composite
def v2_bodies(draw):
    body = {"inputs": draw(st.lists(tensors(), max_size=4) | json_values)}
    for key, values in (("id", st.text(max_size=300) | json_values),
                        ("parameters", st.dictionaries(names, json_values | deep_text, max_size=4) | json_values),
                        ("outputs", st.lists(st.fixed_dictionaries({"name": st.sampled_from(["image", "seeds", "x"])},
                                                                   optional={"parameters": json_values}),
                                             max_size=3) | json_values),
                        ("extra", json_values)):
        if draw(st.booleans()):
            body[key] = draw(values)
    return body


def refused_or_read(protocol, row: dict, headers: dict):
    call = protocol.read_call(HttpRequest(row, headers))
    assert call.failure is None or call.failure.reason != INTERNAL_ERROR, call.failure
    if call.failure is not None:
        assert 400 <= status_of(call.failure) < 500 and len(call.failure.message) < 1024, call.failure
    return call


@FUZZ
@given(v2_bodies())
def test_any_v2_json_body_is_read_or_refused_with_a_4xx(body):
    refused_or_read(KSERVE, {"body": json.dumps(body).encode()}, {"Content-Type": "application/json",
                                                                  "explain": "False"})


@FUZZ
@given(v2_bodies(), st.binary(max_size=64), st.text(max_size=12) | st.integers(-5, 10 ** 30).map(str), st.booleans())
def test_any_v2_binary_body_and_header_length_is_read_or_refused_with_a_4xx(body, tail, length, exact):
    header = json.dumps(body).encode()
    sent = str(len(header)) if exact else length
    if exact and body.get("inputs") and isinstance(body["inputs"], list):
        tail = struct.pack("<I", len(tail)) + tail  # a well-formed BYTES element for binary_data_size to point at
    refused_or_read(KSERVE, {"body": header + tail}, {"Inference-Header-Content-Length": sent})


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_on_the_v2_route_are_read_or_refused_with_a_4xx(raw):
    refused_or_read(KSERVE, {"body": raw}, {"Content-Type": "application/json", "explain": "False"})


form_values = st.text(max_size=30) | st.binary(max_size=30) | deep_text | \
    st.sampled_from([png_bytes(solid(64, 64)), b"GIF89a" + bytes(20), "{\"left\": 8}", "[]"])


@st.composite
def forms(draw):
    row = draw(st.dictionaries(names | st.sampled_from(["image[]", "mask", "n", "size"]), form_values, max_size=6))
    if draw(st.booleans()):
        row["prompt"] = draw(form_values)
    headers = {"Content-Type": draw(st.sampled_from(["multipart/form-data; boundary=x",
                                                     "application/x-www-form-urlencoded"]))}
    if draw(st.booleans()):
        headers[REPEATED_HEADER] = json.dumps(draw(st.lists(st.text(max_size=8), min_size=1, max_size=2)))
    return row, headers


@FUZZ
@given(forms())
def test_any_native_form_is_read_or_refused_with_a_4xx(form):
    row, headers = form
    refused_or_read(NATIVE, row, {**headers, "url_path": ""})


@FUZZ
@given(forms(), st.sampled_from([openai.EDITS, openai.GENERATIONS]))
def test_any_openai_form_is_read_or_refused_with_a_4xx(form, route):
    row, headers = form
    refused_or_read(OPENAI, row, {**headers, "url_path": route})


@pytest.mark.parametrize("protocol, headers", [(NATIVE, {"url_path": ""}),
                                               (OPENAI, {"url_path": openai.EDITS})])
def test_a_repeated_form_field_is_refused_naming_it(protocol, headers):
    row = {"prompt": "a cat", "image": png_bytes(solid(64, 64))}
    call = protocol.read_call(HttpRequest(row, {"Content-Type": "multipart/form-data; boundary=x",
                                                REPEATED_HEADER: json.dumps(["image[]"]), **headers}))
    assert call.failure is not None and status_of(call.failure) == 400
    assert call.failure.field == ("image" if protocol is OPENAI else "image[]")
