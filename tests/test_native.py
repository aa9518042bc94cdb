"""The native protocol on the HTTP edge: content types, Accept negotiation, duplicate keys, uploads, bounded echoes."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from handler.core.contract import Contract
from handler.core.failures import REASONS, Rejection
from handler.core.settings import HandlerSettings
from handler.protocols import http, native
from helpers import read_native

CONTRACT = Contract(HandlerSettings())


def read(body: bytes, content_type="application/json", **headers):
    return read_native(CONTRACT, {"body": body}, {"Content-Type": content_type, **headers})


def rejection(row, headers) -> Rejection:
    with pytest.raises(Rejection) as caught:
        read_native(CONTRACT, row, headers)
    return caught.value


def png(array: np.ndarray, mode=None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_failure_kind_has_a_status():
    assert set(http.STATUS_OF_REASON) == set(REASONS)
    assert all(400 <= status < 600 for status in http.STATUS_OF_REASON.values())


@pytest.mark.parametrize("content_type", ["image/png", "application/xml", "application/octet-stream"])
def test_other_content_types_get_415_naming_the_accepted_ones(content_type):
    error = rejection({"body": b"a cat"}, {"Content-Type": content_type})
    assert http.status_of(error) == 415
    assert content_type in error.message and "application/json" in error.message and "text/plain" in error.message


def test_no_content_type_reads_the_body_as_the_prompt():
    # TorchServe's upstream example sends its prompt file with curl -T, which sets no Content-Type.
    assert read_native(CONTRACT, {"body": b"a cat"}, {}).generation.prompt == "a cat"


def test_json_with_a_charset_and_a_json_suffix_type():
    assert read(b'{"prompt": "a cat"}', "application/json; charset=utf-8").generation.prompt == "a cat"
    assert read(b'{"prompt": "a dog"}', "application/vnd.api+json").generation.prompt == "a dog"


def test_duplicate_json_keys_are_refused():
    error = rejection({"body": b'{"prompt": "a cat", "seed": 1, "seed": 2}'}, {"Content-Type": "application/json"})
    assert http.status_of(error) == 400 and "seed" in error.message and "once" in error.message


@pytest.mark.parametrize("accept, expected", [
    ("image/png;q=0, image/jpeg", "jpeg"),
    ("image/webp;q=0.5, image/png;q=0.9", "png"),
    ("*/*", "array"),
    ("image/*", "png"),
    ("image/*, image/png;q=0", "jpeg"),
    ("application/x-npy", "npy"),
    ("text/html, */*;q=0.8", "array"),
    ("application/json", "array"),
])
def test_accept_honours_q_values_and_wildcards(accept, expected):
    assert native.negotiate_format(accept, "array") == expected


def test_an_accept_that_allows_no_format_is_a_406_unless_the_body_names_one():
    error = rejection({"body": b"a cat"}, {"Content-Type": "text/plain", "Accept": "text/html"})
    assert http.status_of(error) == 406 and "image/png" in error.message
    chosen = read(b'{"prompt": "a", "output_format": "png"}', Accept="text/html")
    assert chosen.output_format == "png"


def test_a_multipart_file_upload_is_read_as_the_image():
    photo = png(np.full((64, 80, 3), 200, dtype=np.uint8))
    row = {"prompt": b"a cat", "image": photo, "strength": b"0.5"}
    request = read_native(CONTRACT, row, {"Content-Type": "multipart/form-data; boundary=x"}).generation
    assert request.task == "image-to-image" and request.image.size == (80, 64)
    assert np.asarray(request.image)[0, 0].tolist() == [200, 200, 200]


def test_a_sixteen_bit_grey_mask_is_scaled_not_clipped():
    grey = np.full((64, 64), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    body = {"prompt": "a", "image": base64.b64encode(png(np.zeros((64, 64, 3), np.uint8))).decode(),
            "mask_image": base64.b64encode(png(grey)).decode()}
    request = read(json.dumps(body).encode()).generation
    assert Image.open(io.BytesIO(png(grey))).mode.startswith("I")
    assert np.asarray(request.mask_image).max() == 128  # 32768 / 65535 * 255, not 255


def test_scalar_checks_run_before_any_image_is_decoded():
    error = rejection({"body": json.dumps({"prompt": "a", "strength": 2.0, "image": "x"}).encode()},
                      {"Content-Type": "application/json"})
    assert error.field == "strength"


def test_huge_unknown_keys_are_not_echoed_back_whole():
    body = json.dumps({"prompt": "a", **{f"key{i}": 1 for i in range(200_000)}, "k" * 1_000_000: 1}).encode()
    error = rejection({"body": body}, {"Content-Type": "application/json"})
    assert error.reason == "unknown_field" and "more" in error.message
    assert len(native.error_body(error)) < 2000


def test_an_explanation_request_is_a_501():
    error = rejection({"body": b"a cat"}, {"Content-Type": "text/plain", "explain": "True"})
    assert http.status_of(error) == 501 and "/predictions" in error.message
