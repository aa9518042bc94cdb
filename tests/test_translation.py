"""Prompt translation (handler/model/translation.py) with a tiny random MarianMT folder built offline.

builder/tiny_translator.py trains character-level sentencepiece models on a few sentences and saves a random
MarianMTModel beside them, laid out like Helsinki-NLP/opus-mt-zh-en; its translations are random English
letters, which is enough to follow a prompt through the path.
"""

import numpy as np
import pytest

from handler.core.contract import GenerationRequest
from handler.core.generation import GenerationEngine, GenerationResult
from handler.core.settings import HandlerSettings, SettingsError
from handler.model.translation import PromptTranslator, has_cjk, load_translator

CHINESE = "一只红色的狐狸在雪地里"


def request(prompt: str, negative_prompt=None) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=2,
                             guidance_scale=7.5, width=64, height=64, seeds=(4,), scheduler=None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model folder holding a translator/ as build_mar.sh --translator packs it."""
    from builder.tiny_translator import build_tiny_translator

    folder = tmp_path_factory.mktemp("model_dir")
    build_tiny_translator(folder / "translator")
    return folder


@pytest.mark.parametrize("text, expected", [
    ("一只猫", True), ("ねこ", True), ("고양이", True), ("a cat, 猫", True),
    ("a cat", False), ("café, naïve", False), ("a cat！", False),  # full-width punctuation alone is not CJK
])
def test_cjk_detection(text, expected):
    assert has_cjk(text) is expected


def test_auto_translates_cjk_prompts_only(model_dir):
    translator = load_translator(model_dir, "auto", "cpu")
    chinese, english = translator.apply([request(CHINESE, "模糊"), request("a red fox", "blurry")])
    assert chinese.prompt == CHINESE and chinese.prompt_translated
    assert chinese.prompt_translated.isascii() and chinese.model_prompt == chinese.prompt_translated
    assert chinese.negative_prompt_translated and chinese.model_negative_prompt == chinese.negative_prompt_translated
    assert english == request("a red fox", "blurry")  # untouched
    assert translator.apply([request(CHINESE)])[0].prompt_translated == chinese.prompt_translated  # deterministic


def test_always_translates_every_prompt_and_never_none(model_dir):
    always = load_translator(model_dir, "always", "cpu")
    assert always.apply([request("a red fox")])[0].prompt_translated
    assert load_translator(model_dir, "never", "cpu") is None
    never = PromptTranslator(model_dir / "translator", "never")
    assert never.apply([request(CHINESE, "模糊")]) == [request(CHINESE, "模糊")]


def test_always_without_a_packed_translator_fails_the_load(tmp_path):
    assert load_translator(tmp_path, "auto", "cpu") is None
    with pytest.raises(SettingsError, match="translate is always but the archive holds no translator"):
        load_translator(tmp_path, "always", "cpu")
    with pytest.raises(SettingsError, match=r"translate must be one of \['auto', 'always', 'never'\]"):
        HandlerSettings.from_mapping({"translate": "yes"})


def test_the_model_draws_the_translation_and_the_answer_reports_it(model_dir, tiny_pipeline):
    translated = load_translator(model_dir, "auto", "cpu").apply([request(CHINESE)])[0]
    engine = GenerationEngine(tiny_pipeline, HandlerSettings().max_batch_pixels)
    result, direct, untranslated = (engine.generate([item])[0] for item in (
        translated, request(translated.prompt_translated), request(CHINESE)))
    assert all(isinstance(outcome, GenerationResult) for outcome in (result, direct, untranslated))
    assert np.array_equal(result.images, direct.images)
    assert not np.array_equal(result.images, untranslated.images)
    assert result.parameters()["prompt"] == CHINESE
    assert result.parameters()["prompt_translated"] == translated.prompt_translated
    assert "prompt_translated" not in direct.parameters()
