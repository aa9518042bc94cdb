"""KServe's protocols in-process: which requests they take, OIP and v1 bodies -> the contract, answers and errors.

The requests are built as TorchServe hands them over (the client's bytes, its headers; the native route's
empty ``url_path``, which KServe's routes lack); the served tiny pipeline answers them through handle().
"""

import base64
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from conftest import set_requests
from handler.protocols import kserve as kserve_api
from handler.protocols.http import HttpRequest, ServedModel
from handler.core.contract import Contract
from handler.core.failures import Rejection
from handler.core.settings import HandlerSettings

DOOR = kserve_api.KServeProtocol(Contract(HandlerSettings()), ServedModel("stable_diffusion", "1.0"))
SMALL = {"num_inference_steps": 2, "width": 64, "height": 64}
NATIVE = {"Content-Type": "application/json", "url_path": ""}  # what /predictions/{model} sends


def tensor(name, datatype, value):
    return {"name": name, "shape": [1], "datatype": datatype, "data": [value]}


def v2_row(inputs, parameters=None, **body):
    document = {"inputs": inputs, **body, **({"parameters": parameters} if parameters is not None else {})}
    return {"body": json.dumps(document).encode()}, {"Content-Type": "application/json"}


def binary_row(prompt: str, seed: int, parameters=None):
    """The binary tensor extension as tritonclient writes it by default: a JSON header, then raw tensors."""
    text = prompt.encode()
    raw = [struct.pack("<I", len(text)) + text, np.array([seed], dtype="<i8").tobytes()]
    header = json.dumps({"inputs": [
        {"name": "prompt", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw[0])}},
        {"name": "seed", "shape": [1], "datatype": "INT64", "parameters": {"binary_data_size": len(raw[1])}}],
        "parameters": {"binary_data_output": True, **(parameters or {})}}).encode()
    return {"body": header + b"".join(raw)}, {"Inference-Header-Content-Length": str(len(header))}


def read(row_and_headers, door=DOOR):
    """The KServe call of a request that routing sends to KServe; None for one it sends elsewhere."""
    request = HttpRequest(*row_and_headers)
    return door.read_call(request) if kserve_api.is_kserve(request) else None


def failure_of(row_and_headers) -> Rejection:
    call = read(row_and_headers)
    assert call is not None and call.failure is not None, call
    return call.failure


def decode_binary(body: bytes, header_length: int) -> tuple[dict, dict]:
    """A binary-extension answer -> (its JSON header, each output's raw bytes)."""
    document, offset, raw = json.loads(body[:header_length]), header_length, {}
    for output in document["outputs"]:
        size = output["parameters"]["binary_data_size"]
        raw[output["name"]], offset = body[offset:offset + size], offset + size
    assert offset == len(body)
    return document, raw


# --- Which protocol --------------------------------------------------------------------------------------------

def test_only_kserve_bodies_without_url_path_come_through_these_doors():
    body = json.dumps({"inputs": [tensor("prompt", "BYTES", "a cat")]}).encode()
    assert read(({"body": body}, {"Content-Type": "application/json"})).protocol == "v2"
    assert read(({"body": body}, {})).protocol == "v2"  # tritonclient sends no Content-Type
    assert read(({"body": json.dumps({"instances": [{"prompt": "a"}]}).encode()}, {})).protocol == "v1"
    assert read(({"body": body}, NATIVE)) is None  # /predictions/{model}: the native door judges it
    assert read(({"body": json.dumps({"prompt": "a cat"}).encode()}, {"Content-Type": "application/json"})) is None
    assert read(({"body": b"a cat"}, {"Content-Type": "text/plain"})) is None
    assert read(binary_row("a cat", 1)).protocol == "v2"


# --- Reading ---------------------------------------------------------------------------------------------------

def test_inputs_and_parameters_become_the_contracts_fields():
    call = read(v2_row([tensor("prompt", "BYTES", "a cat"), tensor("seed", "INT64", 7),
                        tensor("guidance_scale", "FP32", 3)],
                       {"num_inference_steps": 2, "width": 64, "height": 64, "output_format": "png"}, id="req-1"))
    assert call.failure is None and call.request_id == "req-1" and call.formats == ("png",)
    generation = call.parsed[0].generation
    assert (generation.prompt, generation.seeds, generation.guidance_scale) == ("a cat", (7,), 3.0)
    assert (generation.num_inference_steps, generation.width) == (2, 64)
    assert call.outputs == {"image": False, "seeds": False}


def test_binary_inputs_are_read_and_binary_outputs_asked_for():
    call = read(binary_row("a red fox", 2**40 + 3))
    assert call.failure is None and call.parsed[0].generation.prompt == "a red fox"
    assert call.parsed[0].generation.seeds == (2**40 + 3,) and call.outputs == {"image": True, "seeds": True}


@pytest.mark.parametrize("row, field, words", [
    (v2_row([tensor("prompt", "BYTES", "a"), tensor("seed", "FP32", 1.5)]), "seed", "INT64"),
    (v2_row([{"name": "prompt", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]), "prompt", "shape [1]"),
    (v2_row([tensor("prompt", "BYTES", "a"), tensor("colour", "BYTES", "red")]), "colour", "unknown input"),
    (v2_row([tensor("prompt", "BYTES", "a")], {"seed": 1}, outputs=[{"name": "latents"}]), "outputs", "image"),
    (v2_row([tensor("prompt", "BYTES", "a")], outputs=[]), "outputs", "image"),
    (v2_row([tensor("prompt", "BYTES", "a"), tensor("seed", "INT64", 1)], {"seed": 2}), "seed", "twice"),
    (v2_row([tensor("prompt", "BYTES", "a")], {"output_format": "npy"}), "output_format", "png"),
    (v2_row([tensor("prompt", "BYTES", "a")], {"stream": True}), "stream", "stream"),
    (v2_row([tensor("prompt", "BYTES", "a")], {"width": 770}), "width", "770"),
    (v2_row([tensor("prompt", "BYTES", "a")], {"num_inference_steps": 10**6}), "num_inference_steps", "between"),
    (v2_row([]), "inputs", "non-empty"),
])
def test_bad_v2_requests_name_the_field(row, field, words):
    failure = failure_of(row)
    assert failure.field == field and words in failure.message, failure


def test_binary_sizes_must_add_up():
    row, headers = binary_row("a cat", 1)
    assert "binary data" in failure_of(({"body": row["body"] + b"xx"}, headers)).message
    assert failure_of(({"body": row["body"]}, {"Inference-Header-Content-Length": "999999"})).field is None


def test_v1_instances_are_parsed_one_by_one_and_errors_say_which():
    call = read(({"body": json.dumps({"instances": [{"prompt": "a", "seed": 1, **SMALL},
                                                    {"prompt": "b", "output_format": "jpeg", **SMALL}]}).encode()},
                 {}))
    assert call.failure is None and call.formats == ("png", "jpeg")
    assert [request.generation.prompt for request in call.parsed] == ["a", "b"]
    failure = failure_of(({"body": json.dumps({"instances": [{"prompt": "a"}, {"prompt": "b", "seed": -1}]})
                          .encode()}, {}))
    assert failure.field == "instances[1].seed" and failure.message.startswith("instances[1]: seed")
    too_many = failure_of(({"body": json.dumps({"instances": [{"prompt": "a"}] * 5}).encode()}, {}))
    assert too_many.field == "instances" and "max_images" in too_many.message
    assert failure_of(({"body": json.dumps({"instances": [{"prompt": "a", "num_images": 2}]}).encode()},
                       {})).field == "instances[0].num_images"


def test_errors_carry_the_message_where_oip_clients_read_it():
    reply = kserve_api.error_reply(failure_of(v2_row([tensor("prompt", "BYTES", "a")], {"width": 770})))
    body = json.loads(reply.body)
    assert reply.status == 400 and body["field"] == "width" and "770" in body["error"]


# --- Through the handler ---------------------------------------------------------------------------------------

def handle(handler, context, rows_and_headers):
    set_requests(context, [headers for _, headers in rows_and_headers])
    return handler.handle([row for row, _ in rows_and_headers], context)


@pytest.fixture(scope="module")
def served_handler(handler_factory):
    return handler_factory()


def test_one_batch_answers_native_v2_json_v2_binary_and_v1_each_in_its_shape(served_handler):
    handler, context = served_handler
    calls = []
    handler.engine.on_call = lambda images, pixel_steps, seconds: calls.append(images)  # counts pipeline calls
    native = ({"body": json.dumps({"prompt": "a cat", "seed": 3, "output_format": "npy", **SMALL}).encode()}, NATIVE)
    v2 = v2_row([tensor("prompt", "BYTES", "a cat"), tensor("seed", "INT64", 3)], SMALL, id="x")
    v1 = ({"body": json.dumps({"instances": [{"prompt": "a cat", "seed": 3, **SMALL},
                                             {"prompt": "a dog", "seed": 4, **SMALL}]}).encode()}, {})
    bad = v2_row([tensor("prompt", "BYTES", "a cat")], {**SMALL, "width": 770})
    bodies = handle(handler, context, [native, v2, binary_row("a cat", 3, SMALL), v1, bad])
    assert [context.get_response_status(i)[0] for i in range(5)] == [200, 200, 200, 200, 400]
    assert calls == [5], "the four valid requests' five images share one pipeline call"

    reference = np.load(io.BytesIO(bodies[0]))
    document = json.loads(bodies[1])
    assert document["id"] == "x" and document["model_name"] == "stable_diffusion"
    image, seeds = document["outputs"]
    assert (image["name"], image["datatype"], image["shape"]) == ("image", "UINT8", [1, 64, 64, 3])
    assert np.array_equal(np.array(image["data"], dtype=np.uint8).reshape(64, 64, 3), reference)
    assert seeds == {"name": "seeds", "datatype": "INT64", "shape": [1], "data": [3]}

    header_length = int(context.get_response_headers(2)["Inference-Header-Content-Length"])
    _, raw = decode_binary(bodies[2], header_length)
    assert np.array_equal(np.frombuffer(raw["image"], np.uint8).reshape(64, 64, 3), reference)
    assert np.frombuffer(raw["seeds"], "<i8").tolist() == [3]

    predictions = json.loads(bodies[3])["predictions"]
    assert [prediction["seed"] for prediction in predictions] == [3, 4]
    first = np.array(Image.open(io.BytesIO(base64.b64decode(predictions[0]["image"]))))
    # Another row of the same batched call: CPU kernels may round a value differently by one step there.
    assert np.abs(first.astype(int) - reference).max() <= 1
    assert json.loads(bodies[4])["field"] == "width"


def test_png_output_is_bytes_of_base64_files(served_handler):
    handler, context = served_handler
    (body,) = handle(handler, context, [v2_row([tensor("prompt", "BYTES", "a cat")],
                                                {**SMALL, "num_images": 2, "output_format": "png", "seed": 8})])
    image, seeds = json.loads(body)["outputs"]
    assert (image["datatype"], image["shape"], seeds["data"]) == ("BYTES", [2], [8, 9])
    files = [Image.open(io.BytesIO(base64.b64decode(item))) for item in image["data"]]
    assert [(file.format, file.size) for file in files] == [("PNG", (64, 64))] * 2


def test_loras_come_as_json_text_in_a_bytes_input_or_a_parameter():
    from handler.core.capabilities import ModelCapabilities

    door = kserve_api.KServeProtocol(Contract(HandlerSettings(), ModelCapabilities(loras=("ink", "pastel"))),
                                     ServedModel("stable_diffusion", "1.0"))
    chosen = '[{"name": "pastel", "scale": 0.5}, {"name": "ink"}]'
    as_input = read(v2_row([tensor("prompt", "BYTES", "a"), tensor("loras", "BYTES", chosen)]), door)
    as_parameter = read(v2_row([tensor("prompt", "BYTES", "a")], {"loras": chosen}), door)
    assert as_input.parsed[0].generation.loras == as_parameter.parsed[0].generation.loras == (
        ("ink", 1.0), ("pastel", 0.5))
    unknown = read(v2_row([tensor("prompt", "BYTES", "a")], {"loras": '[{"name": "oil"}]'}), door).failure
    assert unknown.field == "loras" and "oil" in unknown.message
    assert read(v2_row([tensor("prompt", "BYTES", "a")], {"loras": "[oops"}), door).failure.field == "loras"
