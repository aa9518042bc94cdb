"""The OpenAI protocol in-process: url_path routing, OpenAI bodies -> the contract, answers and errors in OpenAI's shape.

The protocol's own rules are few (names, response_format, output_format, size's spelling, stream, background, the
mask's meaning); every range and message of a contract field must come from the contract, with the field
named back as the client named it.
"""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, set_requests
from handler.protocols import http, openai as openai_api
from handler.protocols.http import HttpRequest, ServedModel
from handler.core.contract import Contract
from handler.core.failures import REASONS, Rejection
from handler.core.generation import GenerationResult
from handler.core.settings import HandlerSettings

CONTRACT = Contract(HandlerSettings())
DOOR = openai_api.OpenAIProtocol(CONTRACT, ServedModel("stable_diffusion", created=1_700_000_000))
SMALL = {"num_inference_steps": 2}


def json_row(**fields):
    return {"body": json.dumps(fields).encode()}, {"Content-Type": "application/json"}


def read(route=openai_api.GENERATIONS, **fields):
    row, headers = json_row(**fields)
    return DOOR.read(HttpRequest(row, {**headers, "url_path": route}))


def form_read(route=openai_api.EDITS, **fields):
    """A multipart form as TorchServe hands it over with input decoding off: every value as bytes."""
    row = {key: value if isinstance(value, bytes) else str(value).encode() for key, value in fields.items()}
    return DOOR.read(HttpRequest(row, {"Content-Type": "multipart/form-data; boundary=x", "url_path": route}))


def read_at(route, row, headers):
    """What the protocol reads from a row sent to ``route`` (its url_path)."""
    return DOOR.read(HttpRequest(row, {**headers, "url_path": route}))


def refused(call, *args, **kwargs) -> Rejection:
    with pytest.raises(Rejection) as caught:
        call(*args, **kwargs)
    return caught.value


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def openai_mask(width=64, height=64, hole=(16, 48)) -> np.ndarray:
    """An OpenAI mask: opaque everywhere but a transparent square (alpha 0), where the image should change."""
    mask = np.full((height, width, 4), 255, dtype=np.uint8)
    mask[hole[0]:hole[1], hole[0]:hole[1], 3] = 0
    return mask


# --- Routing -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url_path, route", [
    ("v1/images/generations", "v1/images/generations"), ("/v1/images/edits/", "v1/images/edits"),
    ("v1/models", "v1/models"), ("v1", "v1"), (None, None), ("", None), ("images/generations", None),
    ("v10/x", None),
])
def test_only_url_paths_under_v1_come_through_this_door(url_path, route):
    headers = {} if url_path is None else {"url_path": url_path}
    assert openai_api.route_of(HttpRequest({}, headers)) == route


def test_models_lists_the_one_served_model_in_openais_shape():
    call = read_at(openai_api.MODELS, {"body": b""}, {})
    reply = DOOR.respond(call, [])
    assert reply.status == 200 and reply.content_type == "application/json"
    assert json.loads(reply.body) == {"object": "list", "data": [
        {"id": "stable_diffusion", "object": "model", "created": 1_700_000_000, "owned_by": "torchserve"}]}
    one = read_at("v1/models/stable_diffusion", {"body": b""}, {})
    assert json.loads(DOOR.respond(one, []).body)["id"] == "stable_diffusion"


@pytest.mark.parametrize("route, status, code", [
    ("v1/models/dall-e-3", 404, "model_not_found"), ("v1/images/variations", 404, "unknown_url"),
    ("v1/chat/completions", 404, "unknown_url"),
])
def test_other_routes_are_404s_in_openais_shape(route, status, code):
    rejection = refused(read_at, route, {"body": b"{}"}, {"Content-Type": "application/json"})
    reply = openai_api.error_reply(rejection)
    error = json.loads(reply.body)["error"]
    assert reply.status == status and error["code"] == code and error["type"] == "invalid_request_error"
    assert rejection.reason in REASONS  # counted in RejectedRequests like any other rejection


def test_explanations_are_not_offered_here_either():
    row, headers = json_row(prompt="a cat")
    rejection = refused(read_at, openai_api.GENERATIONS, row, {**headers, "explain": "True"})
    assert openai_api.error_reply(rejection).status == 501


# --- Generations: translation ------------------------------------------------------------------------------------

def test_openai_fields_become_the_contracts_fields():
    call = read(prompt="a red fox", n=2, size="512x256", response_format="b64_json", output_format="webp",
                quality="high", style="vivid", user="u-1", model="dall-e-3", background="opaque",
                moderation="low", output_compression=50, stream=False, partial_images=0,
                safety_identifier="s", seed=7, negative_prompt="blurry", guidance_scale=5, scheduler="euler",
                **SMALL)
    generation = call.request.generation
    assert (generation.prompt, generation.width, generation.height, generation.seeds) == ("a red fox", 512, 256,
                                                                                          (7, 8))
    assert (generation.negative_prompt, generation.guidance_scale, generation.scheduler,
            generation.num_inference_steps) == ("blurry", 5, "euler", 2)
    assert call.image_format == "webp" and not call.request.stream


def test_auto_or_no_size_takes_the_models_defaults():
    for call in (read(prompt="a cat", size="auto"), read(prompt="a cat")):
        generation = call.request.generation
        assert (generation.width, generation.height) == (CONTRACT.settings.default_width,
                                                         CONTRACT.settings.default_height)
        assert call.image_format == "png" and generation.num_images == 1


def test_native_size_and_count_fields_work_without_their_openai_names():
    generation = read(prompt="a cat", width=128, height=64, num_images=3).request.generation
    assert (generation.width, generation.height, generation.num_images) == (128, 64, 3)


@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": "url"}, "response_format", ["does not store files", "b64_json"]),
    ({"response_format": "pdf"}, "response_format", ["b64_json"]),
    ({"output_format": "gif"}, "output_format", ["png", "jpeg", "webp"]),
    ({"output_format": "npy"}, "output_format", ["png", "jpeg", "webp"]),
    ({"background": "transparent"}, "background", ["opaque"]),
    ({"stream": True}, "stream", ["stream"]),
    ({"size": "big"}, "size", ["WIDTHxHEIGHT"]),
    ({"size": "512"}, "size", ["WIDTHxHEIGHT"]),
    ({"size": 512}, "size", ["WIDTHxHEIGHT"]),
    ({"n": 2, "num_images": 2}, "n", ["only one"]),
    ({"size": "64x64", "width": 64}, "size", ["only one"]),
    ({"preview_every": 2}, "preview_every", ["stream"]),
    ({"mask": "abc"}, "mask", ["unknown field", "'mask'", "extra_body"]),  # no mask on generations
    ({"colour": "red"}, "colour", ["unknown field", "'colour'", "'n'", "'seed'"]),
])
def test_this_doors_own_rules_are_400s_naming_the_openai_field(fields, param, words):
    rejection = refused(read, prompt="a cat", **fields)
    reply = openai_api.error_reply(rejection)
    error = json.loads(reply.body)["error"]
    assert reply.status == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert all(word in error["message"] for word in words), error["message"]


@pytest.mark.parametrize("fields, param, native", [
    ({"n": 5}, "n", {"num_images": 5}),
    ({"n": "two"}, "n", {"num_images": "two"}),
    ({"size": "770x512"}, "size", {"width": 770, "height": 512}),
    ({"size": "512x2048"}, "size", {"width": 512, "height": 2048}),
    ({"size": "1024x1024", "n": 4}, "n", {"width": 1024, "height": 1024, "num_images": 4}),
    ({"seed": -1}, "seed", {"seed": -1}),
    ({"num_inference_steps": 1000}, "num_inference_steps", {"num_inference_steps": 1000}),
    ({"scheduler": "fancy"}, "scheduler", {"scheduler": "fancy"}),
])
def test_contract_rules_give_the_contracts_message_under_the_openai_name(fields, param, native):
    rejection = refused(read, prompt="a cat", **fields)
    with pytest.raises(Rejection) as contract_says:
        CONTRACT.parse({"prompt": "a cat", **native})
    error = openai_api.error_object(rejection)
    assert error["param"] == param and error["code"] == contract_says.value.reason
    assert error["message"].startswith(contract_says.value.message)  # the contract's words, not a copy


def test_a_missing_or_empty_prompt_is_the_contracts_400():
    for fields in ({}, {"prompt": "   "}, {"n": 1}):
        error = openai_api.error_object(refused(read, **fields))
        assert error["param"] == "prompt" and error["code"] == "missing_prompt"


def test_bodies_that_are_not_json_objects_are_refused_in_openais_shape():
    rejection = refused(read_at, openai_api.GENERATIONS, {"body": b"{not json"}, {"Content-Type": "application/json"})
    reply = openai_api.error_reply(rejection)
    assert reply.status == 400 and json.loads(reply.body)["error"]["code"] == "invalid_json"
    duplicate = refused(read_at, openai_api.GENERATIONS, {"body": b'{"prompt": "a", "prompt": "b"}'},
                        {"Content-Type": "application/json"})
    assert duplicate.reason == "invalid_body"


# --- Edits -------------------------------------------------------------------------------------------------------

def test_an_edit_with_an_openai_mask_is_inpainting_with_white_where_it_was_transparent():
    source = np.full((64, 64, 3), 200, dtype=np.uint8)
    call = form_read(prompt="a cat", image=png(source), mask=png(openai_mask()), n=2, size="64x64",
                     num_inference_steps=2, seed=3)
    generation = call.request.generation
    assert generation.task == "inpainting" and generation.seeds == (3, 4)
    mask = np.asarray(generation.mask_image)
    assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
    assert (mask[16:48, 16:48] == 255).all() and mask[:16].max() == 0 and mask[48:].max() == 0


def test_an_edit_without_a_mask_is_image_to_image_at_the_inputs_size():
    call = form_read(prompt="a cat", image=png(np.zeros((72, 96, 3), dtype=np.uint8)), strength="0.5")
    generation = call.request.generation
    assert generation.task == "image-to-image" and (generation.width, generation.height) == (96, 72)
    assert generation.strength == 0.5


def test_the_sdks_image_list_with_one_image_is_the_image():
    call = form_read(prompt="a cat", **{"image[]": png(np.zeros((64, 64, 3), dtype=np.uint8))})
    assert call.request.generation.task == "image-to-image"


def test_a_json_edit_takes_base64_images():
    image = base64.b64encode(png(np.zeros((64, 64, 3), dtype=np.uint8))).decode()
    mask = "data:image/png;base64," + base64.b64encode(png(openai_mask())).decode()
    call = read(openai_api.EDITS, prompt="a cat", image=image, mask=mask)
    assert call.request.generation.task == "inpainting"


@pytest.mark.parametrize("mask, words", [
    (np.full((64, 64, 4), 255, dtype=np.uint8), ["no fully transparent pixels", "mask_image"]),
    (np.full((64, 64, 3), 255, dtype=np.uint8), ["no fully transparent pixels"]),  # no alpha channel at all
])
def test_a_mask_with_nothing_transparent_is_refused(mask, words):
    rejection = refused(form_read, prompt="a cat", image=png(np.zeros((64, 64, 3), dtype=np.uint8)), mask=png(mask))
    error = openai_api.error_object(rejection)
    assert error["param"] == "mask" and all(word in error["message"] for word in words)


def test_edit_errors_name_the_openai_fields():
    image = png(np.zeros((64, 64, 3), dtype=np.uint8))
    assert openai_api.error_object(refused(form_read, prompt="a cat"))["param"] == "image"
    bad_mask = openai_api.error_object(refused(form_read, prompt="a cat", image=image, mask=b"\x89PNG\r\n\x1a\nxx"))
    assert bad_mask["param"] == "mask" and bad_mask["code"] == "invalid_image"
    assert openai_api.error_object(refused(form_read, prompt="a cat", image=image, markup=image))["param"] == "markup"
    both = refused(form_read, prompt="a cat", image=image, mask=png(openai_mask()), mask_image=png(openai_mask()))
    assert openai_api.error_object(both)["param"] == "mask"
    too_big = refused(form_read, prompt="a cat", image=image, size="64x2048")
    assert openai_api.error_object(too_big)["param"] == "size" and "2048" in too_big.message


def test_a_model_without_inpainting_says_so_for_the_mask():
    from helpers import capabilities_of_family
    from handler.core.capabilities import IMAGE_TO_IMAGE, TEXT_TO_IMAGE

    door = openai_api.OpenAIProtocol(Contract(HandlerSettings(), capabilities_of_family("sd1", (TEXT_TO_IMAGE,
                                                                                                IMAGE_TO_IMAGE))),
                                     ServedModel("stable_diffusion"))
    image = png(np.zeros((64, 64, 3), dtype=np.uint8))
    row = {"prompt": b"a cat", "image": image, "mask": png(openai_mask())}
    rejection = refused(door.read, HttpRequest(row, {"Content-Type": "multipart/form-data",
                                                     "url_path": openai_api.EDITS}))
    assert rejection.reason == "unsupported_task" and rejection.field == "mask"


# --- Answers -----------------------------------------------------------------------------------------------------

def test_a_result_is_an_images_response_with_the_seeds_header():
    call = read(prompt="a red fox", n=2, size="128x64", seed=11, output_format="jpeg")
    images = np.stack([np.full((64, 128, 3), value, dtype=np.uint8) for value in (10, 240)])
    reply = DOOR.respond(call, [GenerationResult(call.request.generation, images, {"pipeline": 1.0})])
    assert reply.status == 200 and reply.headers == {"X-Seeds": "11,12"}
    document = json.loads(reply.body)
    assert set(document) == {"created", "data", "background", "output_format", "size"}
    assert isinstance(document["created"], int) and document["size"] == "128x64"
    assert [item["revised_prompt"] for item in document["data"]] == ["a red fox"] * 2
    decoded = [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in document["data"]]
    assert [(image.format, image.size) for image in decoded] == [("JPEG", (128, 64))] * 2
    assert abs(int(np.asarray(decoded[1]).mean()) - 240) <= 2


@pytest.mark.parametrize("reason", REASONS)
def test_every_failure_kind_has_an_openai_error_with_the_native_status(reason):
    reply = openai_api.error_reply(Rejection(reason, "what went wrong", "seed"))
    error = json.loads(reply.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert reply.status == http.STATUS_OF_REASON[reason] and error["code"] == reason
    assert error["type"] == ("invalid_request_error" if reply.status < 500 else "server_error")
    # The SDK retries 5xx by itself; a deadline or a bug would only fail again.
    assert reply.headers.get("x-should-retry") == (None if reply.status < 500 or reason == "out_of_memory"
                                                   else "false")


def test_a_generation_failure_is_answered_in_openais_shape():
    call = read(prompt="a cat", n=2)
    reply = DOOR.respond(call, [Rejection("timeout", "ran past timeout_seconds", "timeout_seconds")])
    assert reply.status == 504 and json.loads(reply.body)["error"]["param"] == "timeout_seconds"


# --- Through the handler, in one batch with native requests ------------------------------------------------------

def test_openai_and_native_requests_in_one_batch_are_each_answered_in_their_own_shape(handler_factory):
    handler, context = handler_factory()
    rows = [
        ({"body": json.dumps({"prompt": "a cat", "seed": 1, "n": 2, "size": "64x64", **SMALL}).encode()},
         {"Content-Type": "application/json", "url_path": "v1/images/generations"}),
        ({"body": json.dumps({"prompt": "a cat", "seed": 5, "width": 64, "height": 64, "output_format": "json",
                              **SMALL}).encode()}, {"Content-Type": "application/json", "url_path": ""}),
        ({"body": json.dumps({"prompt": "a cat", "size": "70x64"}).encode()},
         {"Content-Type": "application/json", "url_path": "v1/images/generations"}),
        ({"body": b""}, {"url_path": "v1/models"}),
        ({"body": json.dumps({"prompt": "a dog", "width": 770}).encode()}, {"Content-Type": "application/json"}),
    ]
    set_requests(context, [headers for _, headers in rows])
    bodies = handler.handle([row for row, _ in rows], context)
    statuses = [context.get_response_status(index)[0] for index in range(len(rows))]
    assert statuses == [200, 200, 400, 200, 400]
    openai_images = json.loads(bodies[0])
    assert len(openai_images["data"]) == 2 and context.get_response_headers(0)["X-Seeds"] == "1,2"
    assert openai_images["data"][0]["b64_json"] != openai_images["data"][1]["b64_json"]
    native = json.loads(bodies[1])
    assert native["seeds"] == [5] and native["timings_ms"]["batch_images"] == 3  # one pipeline call for both
    assert json.loads(bodies[2])["error"]["param"] == "size"
    assert json.loads(bodies[3])["data"][0]["id"] == "stable_diffusion"
    assert json.loads(bodies[4])["error"]["field"] == "width"  # the native shape
