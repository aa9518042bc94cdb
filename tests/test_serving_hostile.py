"""Second hostile-input round (issue 20) against a real TorchServe: client bodies that reached a 500, a silent
drop or a misleading message. Each case asserts the status, the protocol's error shape and the field named."""

import pytest

from helpers import SMALL, error_of, predict

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
