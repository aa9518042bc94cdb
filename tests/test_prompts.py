"""Prompt syntax and long prompts (handler/core/prompts.py) on the tiny SD 1 and SDXL pipelines.

The tiny tokenizer has one token per non-space character, so where two prompts' tokens start to differ is easy
to count (``first_difference`` checks it where it matters).
"""

import numpy as np
import pytest
import torch

from handler.core.contract import GenerationRequest
from handler.core.failures import Rejection
from handler.core.generation import GenerationEngine, GenerationResult
from handler.core.prompts import (
    A1111Encoder, CompelEncoder, Fragment, chunk_tokens, parse_a1111, prompt_encoder_for,
)
from handler.core.settings import HandlerSettings, SettingsError
from helpers import LONG_PROMPT, LONG_PROMPT_CHANGED

WINDOW = 75  # tokens of one chunk between BOS and EOS


def first_difference(tokenizer, one: str, other: str) -> int:
    """The position (BOS = 0) of the first token where two prompts differ."""
    ids = [tokenizer(text).input_ids for text in (one, other)]
    return next(index for index, (a, b) in enumerate(zip(*ids)) if a != b)


def request(prompt: str, negative_prompt=None, seed: int = 3, num_images: int = 1) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=2,
                             guidance_scale=7.5, width=64, height=64,
                             seeds=tuple(range(seed, seed + num_images)), scheduler=None)


def images(engine: GenerationEngine, *requests: GenerationRequest) -> list[np.ndarray]:
    outcomes = engine.generate(list(requests))
    assert all(isinstance(outcome, GenerationResult) for outcome in outcomes), outcomes
    return [outcome.images for outcome in outcomes]


def one(engine: GenerationEngine, prompt: str, negative_prompt=None) -> np.ndarray:
    return images(engine, request(prompt, negative_prompt))[0]


@pytest.fixture(scope="module")
def engines(tiny_pipeline):
    """(plain, a1111, compel) engines over the same tiny SD 1 weights."""
    return tuple(GenerationEngine(tiny_pipeline, HandlerSettings().max_batch_pixels,
                                  prompt_encoder=prompt_encoder_for(tiny_pipeline, syntax))
                 for syntax in ("plain", "a1111", "compel"))


@pytest.fixture(scope="module")
def sdxl_pipeline(tmp_path_factory):
    from builder.tiny_pipeline import build_tiny_pipeline

    pipeline = build_tiny_pipeline(tmp_path_factory.mktemp("sdxl") / "pipeline", "sdxl")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# --- AUTOMATIC1111's syntax --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a (cat:1.3) dog", [("a ", 1.0), ("cat", 1.3), (" dog", 1.0)]),
    ("(cat)", [("cat", 1.1)]),
    ("((cat))", [("cat", pytest.approx(1.21))]),
    ("[cat]", [("cat", pytest.approx(1 / 1.1))]),
    ("(a [b]:2)", [("a ", 2.0), ("b", pytest.approx(2 / 1.1))]),
    (r"\(cat\) \[x\]", [("(cat) [x]", 1.0)]),
    ("a (cat", [("a ", 1.0), ("cat", 1.1)]),  # unclosed: weights the rest, as AUTOMATIC1111 does
    ("a cat)]", [("a cat)]", 1.0)]),  # stray closers are text
    ("(a:..)", [("a:..)", 1.1)]),  # a weight that is not a number: text, and the group stays open
    ("time: 3", [("time: 3", 1.0)]),
    ("", [("", 1.0)]),
])
def test_a1111_weights(prompt, expected):
    assert [(fragment.text, fragment.weight) for fragment in parse_a1111(prompt)] == expected


def test_break_is_a_chunk_boundary(tiny_pipeline):
    fragments = parse_a1111("a cat BREAK a dog")
    assert [fragment.is_break for fragment in fragments] == [False, True, False]
    chunks = chunk_tokens(tiny_pipeline.tokenizer, fragments)
    assert len(chunks) == 2 and all(len(chunk.ids) == 77 for chunk in chunks)


def test_long_prompts_are_cut_into_windows_of_75_with_bos_and_eos(tiny_pipeline):
    tokenizer = tiny_pipeline.tokenizer
    chunks = chunk_tokens(tokenizer, [Fragment("x" * 160, 1.5)])
    assert len(chunks) == 3
    for chunk in chunks:
        assert len(chunk.ids) == len(chunk.weights) == 77
        assert chunk.ids[0] == tokenizer.bos_token_id and chunk.ids[-1] in (tokenizer.eos_token_id,
                                                                             tokenizer.pad_token_id)
    assert chunks[0].weights[1:-1] == (1.5,) * WINDOW and chunks[2].weights[1:11] == (1.5,) * 10
    assert chunks[2].ids[11] == tokenizer.eos_token_id  # the last chunk: 10 tokens, EOS, then padding


def test_a_full_window_moves_the_words_after_a_late_comma_to_the_next(tiny_pipeline):
    tokenizer = tiny_pipeline.tokenizer
    prompt = "y" * 70 + ", zzzzzzzzzz"  # the comma is token 71: a window filling at 75 breaks after it
    chunks = chunk_tokens(tokenizer, [Fragment(prompt)])
    first = tokenizer.decode([token for token in chunks[0].ids if token not in (0, 1)])
    assert first.replace(" ", "") == "y" * 70 + ","


def test_an_unweighted_short_prompt_gives_the_plain_image(engines):
    plain, a1111, compel = engines
    for prompt, negative in (("a red fox", None), ("a red fox", "blurry")):
        reference = one(plain, prompt, negative)
        assert np.array_equal(one(a1111, prompt, negative), reference)
        assert np.array_equal(one(compel, prompt, negative), reference)


def test_a_weight_changes_the_image(engines):
    _, a1111, compel = engines
    assert not np.array_equal(one(a1111, "a (red:1.5) fox"), one(a1111, "a red fox"))
    assert not np.array_equal(one(a1111, "a [red] fox"), one(a1111, "a red fox"))
    assert not np.array_equal(one(compel, "a red++ fox"), one(compel, "a red fox"))


def test_plain_truncates_after_77_tokens_and_the_syntaxes_do_not(engines):
    plain, a1111, compel = engines
    assert first_difference(plain.pipeline.tokenizer, LONG_PROMPT, LONG_PROMPT_CHANGED) >= 77
    assert np.array_equal(one(plain, LONG_PROMPT), one(plain, LONG_PROMPT_CHANGED))
    assert not np.array_equal(one(a1111, LONG_PROMPT), one(a1111, LONG_PROMPT_CHANGED))
    assert not np.array_equal(one(compel, LONG_PROMPT), one(compel, LONG_PROMPT_CHANGED))


def test_a_request_gets_the_same_image_alone_or_batched(engines):
    """Requests with one and with two chunks, with and without negative prompts, in one batch: each request's
    embeddings are exactly its own; the images agree to one level (a UNet batch of another size may round the
    last bit of a pixel differently on CPU, prompts or not)."""
    _, a1111, compel = engines
    batch = [request("a (red:1.3) fox", seed=1), request(LONG_PROMPT, seed=2, num_images=2),
             request("a (cat:0.8)", seed=5), request("a [dog]", "blurry", seed=7),
             request(LONG_PROMPT, "(blurry:1.4), " + LONG_PROMPT, seed=8)]
    for engine in (a1111, compel):
        together = images(engine, *batch)
        for member, image in zip(batch, together):
            assert np.abs(images(engine, member)[0].astype(int) - image).max() <= 1
        encoder = engine.prompt_encoder
        prompts, negatives = ["a (red:1.3) fox", "a (cat:0.8)"], [None, None]
        shared = encoder.arguments(prompts, negatives)
        for index, prompt in enumerate(prompts):
            alone = encoder.arguments([prompt], [None])
            assert all(torch.equal(shared[name][index], alone[name][0]) for name in alone)


def test_sdxl_reads_weights_and_long_prompts_with_both_encoders(sdxl_pipeline):
    plain = GenerationEngine(sdxl_pipeline, HandlerSettings().max_batch_pixels)
    a1111 = GenerationEngine(sdxl_pipeline, HandlerSettings().max_batch_pixels,
                             prompt_encoder=A1111Encoder(sdxl_pipeline))
    compel = GenerationEngine(sdxl_pipeline, HandlerSettings().max_batch_pixels,
                              prompt_encoder=CompelEncoder(sdxl_pipeline))
    assert np.array_equal(one(a1111, "a red fox"), one(plain, "a red fox"))
    assert np.array_equal(one(a1111, "a red fox", "blurry"), one(plain, "a red fox", "blurry"))
    assert not np.array_equal(one(a1111, "a (red:1.5) fox"), one(a1111, "a red fox"))
    assert np.array_equal(one(plain, LONG_PROMPT), one(plain, LONG_PROMPT_CHANGED))
    assert not np.array_equal(one(a1111, LONG_PROMPT), one(a1111, LONG_PROMPT_CHANGED))
    assert not np.array_equal(one(compel, LONG_PROMPT), one(compel, LONG_PROMPT_CHANGED))
    arguments = A1111Encoder(sdxl_pipeline).arguments([LONG_PROMPT], [None])
    assert arguments["prompt_embeds"].shape == (1, 2 * 77, 64)
    assert arguments["pooled_prompt_embeds"].shape == (1, 32)
    assert not arguments["negative_prompt_embeds"].any()  # force_zeros_for_empty_prompt, as the pipeline does


def test_sd3_and_flux_keep_plain(tmp_path):
    from builder.tiny_pipeline import build_tiny_pipeline

    pipeline = build_tiny_pipeline(tmp_path / "sd3", "sd3")
    assert prompt_encoder_for(pipeline, "plain") is None
    with pytest.raises(SettingsError, match="prompt_syntax a1111 needs .* set prompt_syntax plain"):
        prompt_encoder_for(pipeline, "a1111")


def test_a_prompt_the_library_cannot_read_costs_its_request_only(engines, monkeypatch):
    """compel reads malformed text leniently; this stands in for a future parser error (the one mock here)."""
    _, _, compel = engines
    original = compel.prompt_encoder.length_key

    def refuse_one(prompt, negative_prompt):
        if prompt == "unreadable":
            raise ValueError("unexpected token")
        return original(prompt, negative_prompt)

    monkeypatch.setattr(compel.prompt_encoder, "length_key", refuse_one)
    outcomes = compel.generate([request("unreadable"), request("a red fox")])
    assert isinstance(outcomes[0], Rejection) and outcomes[0].field == "prompt"
    assert "unexpected token" in outcomes[0].message
    assert isinstance(outcomes[1], GenerationResult)


def test_settings_name_the_syntaxes():
    assert HandlerSettings.from_mapping({"prompt_syntax": "a1111"}).prompt_syntax == "a1111"
    with pytest.raises(SettingsError, match=r"prompt_syntax must be one of \['plain', 'a1111', 'compel'\]"):
        HandlerSettings.from_mapping({"prompt_syntax": "A1111"})


def test_image_to_image_and_inpainting_read_the_embeddings_too(engines):
    from dataclasses import replace

    from PIL import Image

    plain, a1111, _ = engines
    image = Image.new("RGB", (64, 64), (120, 80, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for extra in ({"image": image, "strength": 0.8}, {"image": image, "mask_image": mask, "strength": 0.8}):
        def edited(engine, prompt):
            return images(engine, replace(request(prompt, "blurry"), **extra))[0]

        assert np.array_equal(edited(a1111, "a red fox"), edited(plain, "a red fox"))
        assert not np.array_equal(edited(a1111, LONG_PROMPT), edited(a1111, LONG_PROMPT_CHANGED))
