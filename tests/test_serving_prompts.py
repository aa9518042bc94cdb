"""Prompt syntax, long prompts and translation through a real TorchServe: a tiny .mar built by build_mar.sh with
``prompt_syntax: a1111`` and the tiny MarianMT translator packed with ``--translator`` (translate: auto)."""

import numpy as np
import openai
import pytest

from helpers import (
    LONG_PROMPT, LONG_PROMPT_CHANGED, MODEL, error_of, json_images, management, predict, start_server, stop_server,
    write_model_config,
)

pytestmark = pytest.mark.serving

SMALL = {"num_inference_steps": 2, "width": 64, "height": 64, "seed": 11, "output_format": "json"}
CHINESE = "山上的灯塔"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from builder.tiny_translator import build_tiny_translator
    from helpers import run_build_mar

    work = tmp_path_factory.mktemp("prompts")
    translator = build_tiny_translator(work / "opus-mt-tiny")
    config = write_model_config(work / "model-config.yaml", {"minWorkers": 1, "maxWorkers": 1},
                                {"warmup": False, "prompt_syntax": "a1111"})
    run_build_mar("--tiny", "--translator", translator, "--config-file", config, "--export-path", work / "store",
                  "--work-dir", work / "scratch")
    served = start_server(work / "server", work / "store" / f"{MODEL}.mar")
    try:
        yield served
    finally:
        stop_server(served)


def generate(server, prompt: str, **fields) -> dict:
    response = predict(server, {"prompt": prompt, **SMALL, **fields})
    assert response.status_code == 200, response.text[:300]
    return response.json()


def test_describe_says_how_prompts_are_read(server):
    response = management(server, "GET", f"/models/{MODEL}?customized=true")
    assert response.status_code == 200, response.text[:300]
    assert response.json()[0]["customizedMetadata"]["prompts"] == {"prompt_syntax": "a1111", "translate": "auto"}


def test_a_weight_changes_the_image(server):
    plain, weighted = (json_images(generate(server, prompt))[0] for prompt in ("a red fox", "a (red:1.5) fox"))
    assert not np.array_equal(plain, weighted)
    assert np.array_equal(json_images(generate(server, "a red fox"))[0], plain)


@pytest.mark.parametrize("field, text", [
    ("prompt", "(" * 990 + "a red fox" + ")" * 990),  # 1.1 ** 990
    ("prompt", "a (red fox:" + "9" * 45 + ")"),
    ("negative_prompt", "((blurry:0):" + "9" * 400 + ")"),  # an infinite weight times 0: NaN
])
def test_a_weight_that_would_overflow_is_refused_naming_its_field(server, field, text):
    fields = {"prompt": "a red fox", field: text}
    response = predict(server, {**SMALL, **fields})
    assert response.status_code == 400, response.text[:300]
    error = error_of(response)
    assert error["field"] == field and "-10 to 10" in error["message"], error
    assert np.ptp(json_images(generate(server, "a (red fox:10)"))[0]) > 0  # the bound itself is served


def test_a_prompt_longer_than_77_tokens_is_read_to_its_end(server):
    long, changed = (json_images(generate(server, prompt, negative_prompt="(blurry:1.2)"))[0]
                     for prompt in (LONG_PROMPT, LONG_PROMPT_CHANGED))
    assert not np.array_equal(long, changed)


def test_a_chinese_prompt_is_translated_and_reported(server):
    result = generate(server, CHINESE)
    parameters = result["parameters"]
    assert parameters["prompt"] == CHINESE and parameters["prompt_translated"].isascii()
    direct = generate(server, parameters["prompt_translated"])
    assert "prompt_translated" not in direct["parameters"]  # auto: English is left as it is
    assert np.array_equal(json_images(result)[0], json_images(direct)[0])

    client = openai.OpenAI(base_url=f"{server.inference_url}/predictions/{MODEL}/1.0/v1",
                           api_key=server.keys()["inference"]["key"], max_retries=0, timeout=300)
    answer = client.images.generate(prompt=CHINESE, size="64x64", extra_body={"seed": 11, "num_inference_steps": 2})
    assert answer.data[0].revised_prompt == parameters["prompt_translated"]
