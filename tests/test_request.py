"""The native door and the contract: every way a TorchServe row can carry a request, and every field's limits."""

import base64
import io
import json
import math
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from handler.core.contract import Contract, GenerationRequest
from handler.core.failures import Rejection
from handler.protocols.http import status_of
from handler.protocols.native import NativeRequest, error_body
from helpers import read_native as read_request
from handler.core.capabilities import ModelCapabilities
from handler.core.schedulers import DISCRETE, FLOW_MATCHING, scheduler_names
from handler.core.settings import HandlerSettings, SettingsError

DEFAULTS = HandlerSettings()


@pytest.fixture
def parser():
    return Contract(HandlerSettings())


def as_worker_row(row, headers):
    """The row and headers as the worker hands them over: a dict body as the client's JSON bytes, and a row
    of fields (no body) as the form it came from."""
    if isinstance(row.get("body"), dict):
        headers = {"Content-Type": "application/json", **headers}
        row = {**row, "body": json.dumps(row["body"]).encode()}
    elif set(row) - {"body", "data"}:
        headers = {"Content-Type": "application/x-www-form-urlencoded", **headers}
    return row, headers


def parse_client(parser, row, headers=None) -> NativeRequest:
    return read_request(parser, *as_worker_row(row, headers or {}))


def parse(parser, row, headers=None) -> GenerationRequest:
    return parse_client(parser, row, headers).generation


def parse_error(parser, row, headers=None) -> Rejection:
    with pytest.raises(Rejection) as caught:
        parse_client(parser, row, headers)
    error = caught.value
    assert 400 <= status_of(error) < 500
    assert error.message
    return error


def png_bytes(width: int, height: int, mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(width * 1000 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_file(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A 1-bit greyscale PNG built by hand: all-black pixels, or ``idat`` as its (possibly broken) data.

    Cheap at any declared size: 20000 x 20000 black pixels compress to about 50 kB.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if idat is None:
        compressor = zlib.compressobj(9)
        row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
        idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and whose pixel data cannot be decoded."""
    return png_file(width, height, idat=b"not zlib")


# --- Where the fields come from -------------------------------------------------------------------------------


def test_text_plain_bytes_body_is_the_prompt(parser):
    request = parse(parser, {"body": b"a cat"}, {"Content-Type": "text/plain"})
    assert request.prompt == "a cat"
    assert request.task == "text-to-image"
    assert (request.width, request.height) == (DEFAULTS.default_width, DEFAULTS.default_height)
    assert request.num_inference_steps == DEFAULTS.default_steps
    assert request.num_images == 1
    assert parse_client(parser, {"body": b"a cat"}, {"Content-Type": "text/plain"}).output_format == \
        DEFAULTS.default_output_format


def test_text_body_is_stripped(parser):
    assert parse(parser, {"body": b"  a cat\n"}).prompt == "a cat"


def test_text_body_as_str_and_data_key(parser):
    assert parse(parser, {"body": "a dog"}).prompt == "a dog"
    assert parse(parser, {"data": b"a fox"}).prompt == "a fox"


def test_json_dict_body(parser):
    request = parse(parser, {"body": {"prompt": "a cat", "num_inference_steps": 10, "guidance_scale": 5}})
    assert request.prompt == "a cat"
    assert request.num_inference_steps == 10
    assert request.guidance_scale == 5.0 and isinstance(request.guidance_scale, float)


@pytest.mark.parametrize("header", ["Content-Type", "content-type", "CONTENT-TYPE"])
def test_json_bytes_with_json_content_type(parser, header):
    body = json.dumps({"prompt": "a cat", "seed": 5, "width": 512}).encode()
    request = parse(parser, {"body": body}, {header: "application/json; charset=utf-8"})
    assert request.prompt == "a cat"
    assert request.seeds == (5,)
    assert request.width == 512


@pytest.mark.parametrize("body", [b"a cat", b"{\"prompt\": ", b"{'prompt': 'x'}"])
def test_invalid_json_with_json_content_type(parser, body):
    error = parse_error(parser, {"body": body}, {"Content-Type": "application/json"})
    assert status_of(error) == 400
    assert error.reason == "invalid_json"
    assert json.loads(error_body(error))["error"]["reason"] == "invalid_json"


@pytest.mark.parametrize("body", [b"[1, 2]", b"\"a cat\"", b"42", b"null"])
def test_json_that_is_not_an_object_with_json_content_type(parser, body):
    error = parse_error(parser, {"body": body}, {"content-type": "application/json"})
    assert error.reason == "invalid_json"


def test_text_body_that_is_a_json_object_is_read_as_json(parser):
    request = parse(parser, {"body": b' {"prompt": "a dog", "seed": 3}'}, {"Content-Type": "text/plain"})
    assert request.prompt == "a dog"
    assert request.seeds == (3,)


@pytest.mark.parametrize("text", ["[1, 2]", "{a cat in braces}"])
def test_text_body_that_is_not_a_json_object_is_the_prompt(parser, text):
    assert parse(parser, {"body": text.encode()}, {"Content-Type": "text/plain"}).prompt == text


def test_form_row_converts_numeric_strings(parser):
    row = {"prompt": b"a cat", "num_inference_steps": b"20", "guidance_scale": b"6.5", "seed": b" 7 ",
           "width": b"512", "num_images": b"2", "output_format": b"json"}
    request = parse(parser, row)
    assert request.prompt == "a cat"
    assert request.num_inference_steps == 20
    assert request.guidance_scale == 6.5
    assert request.seeds == (7, 8)
    assert request.width == 512


def test_form_row_empty_value_means_default(parser):
    request = parse(parser, {"prompt": b"a cat", "num_inference_steps": b"", "width": "  "})
    assert request.num_inference_steps == DEFAULTS.default_steps
    assert request.width == DEFAULTS.default_width


def test_form_row_non_numeric_value(parser):
    error = parse_error(parser, {"prompt": b"a cat", "num_inference_steps": b"twenty"})
    assert error.field == "num_inference_steps"
    assert "twenty" in error.message


def test_form_row_without_prompt(parser):
    error = parse_error(parser, {"num_inference_steps": b"20"})
    assert status_of(error) == 400
    assert error.field == "prompt"
    assert "text/plain" in error.message


@pytest.mark.parametrize("body", [b"", b"   \n\t "], ids=["empty", "whitespace"])
def test_empty_or_whitespace_body(parser, body):
    error = parse_error(parser, {"body": body})
    assert status_of(error) == 400
    assert error.field == "prompt"


def test_empty_prompt_in_json(parser):
    assert parse_error(parser, {"body": {"prompt": "  "}}).field == "prompt"
    assert parse_error(parser, {"body": {"seed": 1}}).field == "prompt"


def test_non_utf8_body(parser):
    error = parse_error(parser, {"body": b"\xff\xfe a cat \xc3"})
    assert status_of(error) == 400
    assert "UTF-8" in error.message


def test_non_utf8_form_value(parser):
    error = parse_error(parser, {"prompt": b"\xff\xfe"})
    assert status_of(error) == 400
    assert "UTF-8" in error.message


def test_nul_in_prompt(parser):
    assert parse_error(parser, {"body": {"prompt": "a\x00cat"}}).field == "prompt"


def test_unknown_field_lists_known_fields(parser):
    error = parse_error(parser, {"body": {"prompt": "a cat", "steps": 20}})
    assert status_of(error) == 400
    assert error.reason == "unknown_field"
    assert "steps" in error.message
    for name in parser.fields:  # every field this model offers (loras and controlnet only where it has some)
        assert name in error.message



def test_prompt_of_wrong_type(parser):
    error = parse_error(parser, {"body": {"prompt": ["a", "cat"]}})
    assert error.field == "prompt"
    assert "['a', 'cat']" in error.message


# --- Numeric fields ------------------------------------------------------------------------------------------

NUMERIC_OUT_OF_RANGE = [
    ("num_inference_steps", 0), ("num_inference_steps", DEFAULTS.max_steps + 1),
    ("guidance_scale", -0.5), ("guidance_scale", 30.5),
    ("width", 8), ("width", DEFAULTS.max_side + 8), ("height", 56), ("height", 2048),
    ("seed", -1), ("seed", 2**63),
    ("num_images", 0), ("num_images", DEFAULTS.max_images + 1),
    ("strength", 0.0), ("strength", 1.25),
]
NUMERIC_FIELDS = sorted({name for name, _ in NUMERIC_OUT_OF_RANGE})
BAD_VALUES = [
    ("wrong-type", "twenty", "'twenty'"),
    ("list", [1], "[1]"),
    ("nan", float("nan"), "nan"),
    ("inf", float("inf"), "inf"),
    ("-inf", float("-inf"), "-inf"),
    ("bool", True, "True"),
]


def with_image(body: dict) -> dict:
    """strength is only valid with an input image; give it one so the error is about the value."""
    if "strength" in body:
        return {**body, "image": b64(png_bytes(64, 64))}
    return body


@pytest.mark.parametrize("name,value", NUMERIC_OUT_OF_RANGE)
def test_numeric_field_out_of_range(parser, name, value):
    error = parse_error(parser, {"body": with_image({"prompt": "a cat", name: value})})
    assert status_of(error) == 400
    assert error.field == name
    assert name in error.message
    assert str(value) in error.message


@pytest.mark.parametrize("name", NUMERIC_FIELDS)
@pytest.mark.parametrize("label,value,shown", BAD_VALUES, ids=[label for label, _, _ in BAD_VALUES])
def test_numeric_field_bad_value(parser, name, label, value, shown):
    error = parse_error(parser, {"body": with_image({"prompt": "a cat", name: value})})
    assert status_of(error) == 400
    assert error.field == name
    assert name in error.message
    assert shown in error.message


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_json_tokens(parser, token):
    body = b'{"prompt": "a cat", "guidance_scale": ' + token + b"}"
    error = parse_error(parser, {"body": body}, {"Content-Type": "application/json"})
    assert error.field == "guidance_scale"


def test_integral_float_is_accepted_for_integer_fields(parser):
    request = parse(parser, {"body": {"prompt": "a cat", "num_inference_steps": 20.0, "width": 512.0}})
    assert request.num_inference_steps == 20 and isinstance(request.num_inference_steps, int)
    assert request.width == 512 and isinstance(request.width, int)


def test_fractional_float_is_refused_for_integer_fields(parser):
    error = parse_error(parser, {"body": {"prompt": "a cat", "num_inference_steps": 20.5}})
    assert error.field == "num_inference_steps"
    assert "20.5" in error.message


def test_width_not_multiple_of_8(parser):
    error = parse_error(parser, {"body": {"prompt": "a cat", "width": 770}})
    assert error.field == "width"
    assert "multiple of 8" in error.message
    assert "770" in error.message


def test_width_times_height_over_max_pixels():
    settings = HandlerSettings.from_mapping({"max_pixels": 512 * 512, "default_width": 512, "default_height": 512})
    parser = Contract(settings)
    assert parse(parser, {"body": {"prompt": "a cat", "width": 512, "height": 512}}).pixels == 512 * 512
    error = parse_error(parser, {"body": {"prompt": "a cat", "width": 1024, "height": 512}})
    assert status_of(error) == 400
    assert str(1024 * 512) in error.message
    assert str(512 * 512) in error.message


def test_num_images_over_max(parser):
    error = parse_error(parser, {"body": {"prompt": "a cat", "num_images": 5, "output_format": "json"}})
    assert error.field == "num_images"
    assert "5" in error.message


def test_request_pixels_over_max(parser):
    body = {"prompt": "a cat", "num_images": 4, "width": 1024, "height": 1024, "output_format": "json"}
    error = parse_error(parser, {"body": body})
    assert error.field == "num_images"
    assert str(4 * 1024 * 1024) in error.message
    assert str(DEFAULTS.max_request_pixels) in error.message


# --- Seeds, formats, schedulers ------------------------------------------------------------------------------


def test_seed_gives_consecutive_seeds(parser):
    request = parse(parser, {"body": {"prompt": "a cat", "seed": 42, "num_images": 3, "output_format": "json"}})
    assert request.seeds == (42, 43, 44)
    assert request.num_images == 3


def test_random_seeds_differ_between_parses(parser):
    first = parse(parser, {"body": b"a cat"})
    second = parse(parser, {"body": b"a cat"})
    assert first.seeds != second.seeds
    assert all(0 <= seed < 2**63 for seed in first.seeds + second.seeds)


def test_random_seeds_of_one_request_are_consecutive(parser):
    request = parse(parser, {"body": {"prompt": "a cat", "num_images": 2, "output_format": "npy"}})
    first, second = request.seeds
    assert second == (first + 1) % 2**63


@pytest.mark.parametrize("header", ["accept", "Accept"])
@pytest.mark.parametrize("accept,expected", [
    ("image/png", "png"),
    ("image/jpeg", "jpeg"),
    ("text/html, image/webp;q=0.9", "webp"),
    ("application/x-npy", "npy"),
    ("*/*", DEFAULTS.default_output_format),
    ("", DEFAULTS.default_output_format),
])
def test_accept_header_selects_format(parser, header, accept, expected):
    assert parse_client(parser, {"body": b"a cat"}, {header: accept}).output_format == expected


def test_output_format_field_wins_over_accept(parser):
    request = parse_client(parser, {"body": {"prompt": "a cat", "output_format": "jpeg"}}, {"Accept": "image/png"})
    assert request.output_format == "jpeg"


@pytest.mark.parametrize("row,headers", [
    ({"body": {"prompt": "a cat", "output_format": "png", "num_images": 2}}, {}),
    ({"body": {"prompt": "a cat", "num_images": 2}}, {"Accept": "image/png"}),
])
def test_single_image_format_with_several_images(parser, row, headers):
    error = parse_error(parser, row, headers)
    assert status_of(error) == 400
    assert error.field == "output_format"
    assert "png" in error.message


def test_unknown_output_format(parser):
    error = parse_error(parser, {"body": {"prompt": "a cat", "output_format": "gif"}})
    assert error.field == "output_format"
    assert "'gif'" in error.message


def test_scheduler_names_are_exact(parser):
    assert parse(parser, {"body": {"prompt": "a cat", "scheduler": "euler_a"}}).scheduler == "euler_a"
    assert parse(parser, {"body": b"a cat"}).scheduler is None
    assert parse_error(parser, {"body": {"prompt": "a cat", "scheduler": "Euler_A"}}).field == "scheduler"


def test_unknown_scheduler_lists_choices(parser):
    error = parse_error(parser, {"body": {"prompt": "a cat", "scheduler": "k_lms"}})
    assert error.field == "scheduler"
    assert "k_lms" in error.message
    for name in scheduler_names(DISCRETE):
        assert name in error.message
    assert "flow_match_euler" not in error.message


def test_long_prompt(parser):
    limit = DEFAULTS.max_prompt_length
    assert parse(parser, {"body": {"prompt": "a" * limit}}).prompt == "a" * limit
    error = parse_error(parser, {"body": {"prompt": "a" * (limit + 1)}})
    assert error.field == "prompt"
    assert str(limit + 1) in error.message and str(limit) in error.message
    error = parse_error(parser, {"body": {"prompt": "a cat", "negative_prompt": "b" * (limit + 1)}})
    assert error.field == "negative_prompt"


# --- Input images --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_data_url", [False, True], ids=["base64", "data-url"])
def test_image_gives_image_to_image_at_image_size(parser, as_data_url):
    encoded = b64(png_bytes(100, 70))
    if as_data_url:
        encoded = "data:image/png;base64," + encoded
    request = parse(parser, {"body": {"prompt": "a cat", "image": encoded}})
    assert request.task == "image-to-image"
    assert (request.width, request.height) == (96, 64)  # 100x70 rounded down to multiples of 8
    assert request.image.size == (96, 64)
    assert request.image.mode == "RGB"
    assert request.strength == DEFAULTS.default_strength
    assert request.strength == DEFAULTS.default_strength


def test_image_is_resized_to_width_and_height(parser):
    body = {"prompt": "a cat", "image": b64(png_bytes(100, 70, "RGBA")), "width": 128, "height": 64,
            "strength": 0.5}
    request = parse(parser, {"body": body})
    assert request.image.size == (128, 64)
    assert request.image.mode == "RGB"
    assert request.strength == 0.5


def test_image_from_form_row(parser):
    row = {"prompt": b"a cat", "image": b64(png_bytes(64, 64)).encode(), "strength": b"0.3"}
    request = parse(parser, row)
    assert request.task == "image-to-image"
    assert request.strength == 0.3


def test_mask_image_gives_inpainting(parser):
    body = {"prompt": "a cat", "image": b64(png_bytes(80, 64)), "mask_image": b64(png_bytes(40, 32))}
    request = parse(parser, {"body": body})
    assert request.task == "inpainting"
    assert request.mask_image.mode == "L"
    assert request.mask_image.size == request.image.size == (80, 64)


def test_text_request_has_no_strength(parser):
    request = parse(parser, {"body": b"a cat"})
    assert request.strength is None


def test_image_too_small_without_size(parser):
    error = parse_error(parser, {"body": {"prompt": "a cat", "image": b64(png_bytes(40, 40))}})
    assert status_of(error) == 400
    assert error.field == "image" and "pass width and height" in error.message  # the client sent no width


@pytest.mark.parametrize("value", ["not base64!!", "data:image/png;base64,@@@@", "", 12, ["x"]])
def test_bad_image_value(parser, value):
    error = parse_error(parser, {"body": {"prompt": "a cat", "image": value}})
    assert status_of(error) == 400
    assert error.field == "image"


def test_image_that_is_not_an_image(parser):
    error = parse_error(parser, {"body": {"prompt": "a cat", "image": b64(b"hello, not a picture")}})
    assert status_of(error) == 400
    assert error.field == "image"


def test_image_of_unsupported_format(parser):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="BMP")
    error = parse_error(parser, {"body": {"prompt": "a cat", "image": b64(buffer.getvalue())}})
    assert status_of(error) == 400


def test_hand_made_png_is_a_real_image(parser):
    request = parse(parser, {"body": {"prompt": "a cat", "image": b64(png_file(64, 64))}})
    assert request.image.size == (64, 64)
    assert np.asarray(request.image).max() == 0


@pytest.mark.parametrize("side", [5000, 20000])  # above the setting; above Pillow's own bomb limit too
def test_image_bomb_is_refused_before_decoding(parser, side):
    bomb = png_file(side, side)
    assert len(bomb) < 200_000  # tiny on the wire, millions of pixels declared
    error = parse_error(parser, {"body": {"prompt": "a cat", "image": b64(bomb)}})
    assert status_of(error) == 413
    assert error.field == "image"
    assert error.reason == "image_too_large"


def test_oversized_header_is_413_not_a_decode_error(parser):
    # The pixel data is garbage: a 413 (not a 400 "not readable") shows the size was checked before decoding.
    side = math.isqrt(DEFAULTS.max_input_image_pixels) + 8
    error = parse_error(parser, {"body": {"prompt": "a cat", "image": b64(png_header_only(side, side))}})
    assert status_of(error) == 413
    assert f"{side}x{side}" in error.message
    assert str(DEFAULTS.max_input_image_pixels) in error.message


def test_header_of_allowed_size_with_corrupt_data_is_400(parser):
    error = parse_error(parser, {"body": {"prompt": "a cat", "image": b64(png_header_only(64, 64))}})
    assert status_of(error) == 400
    assert error.field == "image"


def test_mask_bomb_is_413(parser):
    body = {"prompt": "a cat", "image": b64(png_bytes(64, 64)), "mask_image": b64(png_header_only(5000, 5000))}
    error = parse_error(parser, {"body": body})
    assert status_of(error) == 413
    assert error.field == "mask_image"


def test_mask_image_without_image(parser):
    error = parse_error(parser, {"body": {"prompt": "a cat", "mask_image": b64(png_bytes(64, 64))}})
    assert status_of(error) == 400
    assert error.field == "mask_image"
    assert "image" in error.message


def test_strength_without_image(parser):
    error = parse_error(parser, {"body": {"prompt": "a cat", "strength": 0.5}})
    assert status_of(error) == 400
    assert error.field == "strength"


# --- Inputs TorchServe can hand over that must be a 4xx, not a crash ----------------------------------------
# TorchServe json.loads an application/json body itself and, when that fails, forwards the raw bytes; both
# paths below reach the parser.


def test_json_with_huge_integer_literal_is_400(parser):
    body = b'{"prompt": "a cat", "seed": ' + b"9" * 5000 + b"}"
    error = parse_error(parser, {"body": body}, {"Content-Type": "application/json"})
    assert status_of(error) == 400


def test_deeply_nested_json_is_400(parser):
    body = b'{"prompt": "a cat", "seed": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    error = parse_error(parser, {"body": body}, {"Content-Type": "application/json"})
    assert status_of(error) == 400


@pytest.mark.parametrize("name", ["guidance_scale", "strength"])
def test_integer_too_large_for_a_float_is_400(parser, name):
    error = parse_error(parser, {"body": with_image({"prompt": "a cat", name: 10**400})})
    assert status_of(error) == 400
    assert error.field == name


def test_line_wrapped_base64_images_are_accepted(parser):
    wrapped = base64.encodebytes(png_bytes(64, 64)).decode()
    assert "\n" in wrapped
    assert parse(parser, {"body": {"prompt": "a", "image": wrapped}}).task == "image-to-image"


def test_empty_form_image_fields_mean_left_out(parser):
    request = parse(parser, {"prompt": b"a", "image": b"", "mask_image": b"", "strength": b""})
    assert request.task == "text-to-image" and request.strength is None


FLUX_LIKE = ModelCapabilities(pipeline_class="FluxPipeline", size_multiple=16,
                              schedulers=scheduler_names(FLOW_MATCHING), negative_prompt=False,
                              tasks=("text-to-image",))


@pytest.mark.parametrize("body, field, fragment", [
    ({"width": 72}, "width", "multiple of 16"),
    ({"scheduler": "ddim"}, "scheduler", "flow_match_euler"),
    ({"negative_prompt": "blurry"}, "negative_prompt", "not supported by FluxPipeline"),
    ({"image": b64(png_bytes(64, 64))}, "image", "image is not supported by FluxPipeline"),
])
def test_family_capabilities_shape_the_contract(body, field, fragment):
    error = parse_error(Contract(HandlerSettings(), FLUX_LIKE), {"body": {"prompt": "a cat", **body}})
    assert error.field == field and fragment in error.message


def test_family_capabilities_accept_what_the_family_supports():
    request = parse(Contract(HandlerSettings(), FLUX_LIKE),
                    {"body": {"prompt": "a cat", "width": 80, "scheduler": "flow_match_euler"}})
    assert request.width == 80 and request.scheduler == "flow_match_euler"


def test_a_lone_surrogate_is_a_400_not_a_tokenizer_crash(parser):
    error = parse_error(parser, {"body": {"prompt": "a\ud800"}})
    assert status_of(error) == 400 and error.field == "prompt" and "surrogate" in error.message


def test_too_few_denoising_steps_for_the_strength_is_a_400(parser):
    image = b64(png_bytes(64, 64))
    error = parse_error(parser, {"body": {"prompt": "a", "image": image, "num_inference_steps": 1}})
    assert error.field == "strength" and "at least 1" in error.message
    assert parse(parser, {"body": {"prompt": "a", "image": image, "num_inference_steps": 2}}).strength == 0.8


def test_an_image_size_outside_the_limits_needs_explicit_sides(parser):
    wide = b64(png_bytes(2000, 504))
    error = parse_error(parser, {"body": {"prompt": "a", "image": wide}})
    assert error.field == "image" and "2000" in error.message


@pytest.mark.parametrize("name", ["seed", "width", "scheduler", "negative_prompt", "stream"])
def test_null_is_refused_with_a_hint_to_leave_the_field_out(parser, name):
    error = parse_error(parser, {"body": {"prompt": "a", name: None}})
    assert error.field == name and "leave the field out" in error.message


def test_a_form_field_named_data_is_a_field_not_the_body(parser):
    error = parse_error(parser, {"prompt": b"a", "data": b"b", "output_format": b"json"})
    assert error.field == "data" and "unknown field" in error.message


def test_defaults_off_the_family_size_multiple_fail_the_model_load():
    with pytest.raises(SettingsError, match="multiple of 16"):
        Contract(HandlerSettings(default_width=1000, default_height=1000, max_pixels=2**20,
                                      max_request_pixels=2**22, max_batch_pixels=2**22), FLUX_LIKE)
