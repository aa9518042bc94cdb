"""Second hostile-input round (issue 20) against a real TorchServe: client bodies that reached a 500, a silent
drop or a misleading message. Each case asserts the status, the protocol's error shape and the field named."""

import pytest

from helpers import MODEL, SMALL, error_of, predict

pytestmark = pytest.mark.serving

DEEP = "[" * 5000  # JSON text nested past the parser's recursion limit


@pytest.mark.parametrize("field", ["outpaint", "loras"])
def test_json_text_nested_5000_deep_in_a_form_field_is_a_400_naming_it(torchserve, field):
    response = predict(torchserve, data={"prompt": "a cat", field: DEEP})
    assert response.status_code == 400, response.text[:300]
    assert error_of(response)["field"] == field


@pytest.mark.parametrize("stream", [False, None])
def test_preview_every_without_a_stream_is_a_400_whether_stream_is_false_or_left_out(torchserve, stream):
    body = {"prompt": "a cat", "preview_every": 1, **SMALL, **({} if stream is None else {"stream": stream})}
    response = predict(torchserve, body)
    assert response.status_code == 400, response.text[:300]
    error = error_of(response)
    assert error["field"] == "preview_every" and "stream" in error["message"]


# --- KServe v2 (/v2/models/{model}/infer): every client mistake a 4xx in OIP's shape, {"error": "<message>"} ---

def infer(server, body=None, *, data=None, headers=None):
    return predict(server, body, data=data, headers=headers, route="v2/models", model=f"{MODEL}/infer")


def oip_error(response, status: int = 400) -> dict:
    """The body of an OIP error: ``error`` is the message itself (tritonclient shows it), beside reason/field."""
    assert response.status_code == status, response.text[:300]
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body["error"], str) and body["error"], body
    return body


def tensor(name, datatype, value):
    return {"name": name, "shape": [1], "datatype": datatype, "data": [value]}


PROMPT = tensor("prompt", "BYTES", "a cat")


def test_v2_binary_header_with_a_body_without_inputs_names_inputs(torchserve):
    header = b'{"parameters": {}}'
    response = infer(torchserve, data=header, headers={"Inference-Header-Content-Length": str(len(header))})
    assert oip_error(response)["field"] == "inputs"


@pytest.mark.parametrize("length", ["\u00b2", "9" * 5000])
def test_v2_binary_header_length_that_is_not_a_plain_number_is_a_400(torchserve, length):
    response = infer(torchserve, data=b'{"inputs": []}', headers={"Inference-Header-Content-Length": length})
    assert "Inference-Header-Content-Length" in oip_error(response)["error"]


def test_v2_output_parameters_that_are_not_an_object_name_outputs(torchserve):
    response = infer(torchserve, {"inputs": [PROMPT], "outputs": [{"name": "image", "parameters": [1]}]})
    assert oip_error(response)["field"] == "outputs"


@pytest.mark.parametrize("field", ["guidance_scale", "timeout_seconds"])
def test_v2_an_int64_tensor_with_400_digits_names_its_field(torchserve, field):
    response = infer(torchserve, {"inputs": [PROMPT, tensor(field, "INT64", 10 ** 400)]})
    assert oip_error(response)["field"] == field


@pytest.mark.parametrize("field, value", [("controlnet", "edges"), ("control_image", "aGVsbG8=")])
def test_v2_controlnet_fields_as_tensors_get_the_models_answer_not_a_500(torchserve, field, value):
    response = infer(torchserve, {"inputs": [PROMPT, tensor(field, "BYTES", value)]})
    assert oip_error(response)["field"] == field  # the tiny model has no ControlNets; the contract says so


def test_v2_outpaint_as_a_tensor_outpaints(torchserve):
    from helpers import png_base64, solid

    response = infer(torchserve, {"inputs": [PROMPT, tensor("image", "BYTES", png_base64(solid(64, 64))),
                                             tensor("outpaint", "BYTES", '{"right": 16}'),
                                             tensor("num_inference_steps", "INT32", 2)]})
    assert response.status_code == 200, response.text[:300]
    image = next(output for output in response.json()["outputs"] if output["name"] == "image")
    assert image["shape"] == [1, 64, 80, 3]


@pytest.mark.parametrize("field", ["loras", "outpaint"])
def test_v2_a_parameter_with_json_nested_5000_deep_names_it(torchserve, field):
    response = infer(torchserve, {"inputs": [PROMPT], "parameters": {field: DEEP}})
    assert oip_error(response)["field"] == field


def test_v2_invalid_json_is_answered_in_oips_shape(torchserve):
    response = infer(torchserve, data=b'{"inputs": [', headers={"Content-Type": "application/json"})
    assert oip_error(response)["reason"] == "invalid_json"


def test_v2_an_id_of_a_megabyte_is_refused_not_echoed(torchserve):
    response = infer(torchserve, {"id": "x" * 1_000_000, "inputs": [PROMPT]})
    body = oip_error(response)
    assert body["field"] == "id" and len(response.content) < 1000
