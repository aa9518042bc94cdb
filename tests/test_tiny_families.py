"""Every tiny family builds offline, reloads as a saved checkpoint does, and generates with its real geometry."""

import json

import numpy as np
import pytest
import torch

from handler.model.pipeline_index import null_components
from builder.families import FAMILIES, FAMILY_INFO
from builder.tiny_pipeline import build_tiny_pipeline


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    """(family, folder, pipeline reloaded from the folder) for each family, built once per module."""
    from diffusers import DiffusionPipeline

    folder = tmp_path_factory.mktemp(request.param) / "pipeline"
    build_tiny_pipeline(folder, request.param)
    pipeline = DiffusionPipeline.from_pretrained(folder, local_files_only=True, **null_components(folder))
    pipeline.set_progress_bar_config(disable=True)
    return request.param, folder, pipeline


def generate(pipeline, size: int):
    return pipeline("a cat", height=size, width=size, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0))


def test_reloaded_pipeline_generates(built):
    family, _, pipeline = built
    info = FAMILY_INFO[family]
    output = generate(pipeline, 64)
    assert type(pipeline).__name__ == info.pipeline_class
    assert output.images.shape == (1, 64, 64, 3)
    assert np.isfinite(output.images).all()
    # Flux has no classifier-free guidance switch: guidance_scale is an embedding there.
    assert getattr(pipeline, "do_classifier_free_guidance", False) == info.negative_prompt
    if family == "sd1-safety":
        assert output.nsfw_content_detected == [True]
        assert not output.images.any()
    else:
        assert getattr(output, "nsfw_content_detected", None) is None
        assert output.images.any()


def test_geometry_matches_family_info(built):
    family, _, pipeline = built
    info = FAMILY_INFO[family]
    default_sample_size = getattr(pipeline, "default_sample_size", None) or pipeline.unet.config.sample_size
    assert default_sample_size * pipeline.vae_scale_factor == info.default_size
    scheduler_kind = "flow_matching" if "FlowMatch" in type(pipeline.scheduler).__name__ else "discrete"
    assert scheduler_kind == info.scheduler_kind


def test_size_off_the_multiple_is_refused_or_floored(built):
    family, _, pipeline = built
    size = 64 + FAMILY_INFO[family].size_multiple // 2
    try:
        images = generate(pipeline, size).images
    except ValueError as error:
        assert "divisible by" in str(error)
    else:
        assert images.shape == (1, 64, 64, 3)  # Flux only warns and rounds down


def test_folder_is_small(built):
    _, folder, _ = built
    assert sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) < 10_000_000


def test_family_specifics(built):
    family, folder, pipeline = built
    index = json.loads((folder / "model_index.json").read_text())
    if family == "sd2-v":
        assert pipeline.scheduler.config.prediction_type == "v_prediction"
        assert pipeline.unet.config.use_linear_projection
    elif family == "sd3":
        assert index["text_encoder_3"] == index["tokenizer_3"] == [None, None]
        assert {"text_encoder_3", "tokenizer_3"} <= null_components(folder).keys()
        assert pipeline.text_encoder_3 is None and pipeline.tokenizer_3 is None
    elif family == "flux":
        from transformers import T5TokenizerFast

        tokenizer = T5TokenizerFast.from_pretrained(folder / "tokenizer_2", local_files_only=True)
        ids = tokenizer("A cat, on a mat!").input_ids
        assert tokenizer.unk_token_id not in ids and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == "A cat, on a mat!"
    else:
        assert pipeline.scheduler.config.prediction_type == "epsilon"


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_pipeline(tmp_path, "sd4")


def test_serving_capabilities_read_the_family_facts_off_the_pipeline(built):
    from handler.core.capabilities import TASKS, capabilities_of
    from handler.core.schedulers import scheduler_names

    family, _, pipeline = built
    info = FAMILY_INFO[family]
    capabilities = capabilities_of(pipeline, TASKS)
    assert capabilities.pipeline_class == info.pipeline_class
    assert capabilities.size_multiple == info.size_multiple
    assert capabilities.negative_prompt == info.negative_prompt
    assert capabilities.schedulers == scheduler_names(info.scheduler_kind)
