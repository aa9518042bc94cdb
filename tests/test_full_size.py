"""The full-size random pipelines have the published architectures, checked without building their weights.

Each model component is built from its config on the meta device (no memory, under a second) and its
parameter count compared with the published checkpoint's; the CLIP vocabulary conversion is checked on a small
BPE file of the same format, loaded by the real CLIPTokenizer.
"""

import gzip

import pytest

from builder.build_mar import parse_arguments
from builder.families import FAMILY_INFO, FULL_SIZE_FAMILIES
from builder.full_size import (PIPELINE_CLASSES, PUBLISHED_CONFIGS, PUBLISHED_PARAMETERS, clip_vocabulary,
                               count_parameters, write_clip_tokenizer)


@pytest.mark.parametrize("family", FULL_SIZE_FAMILIES)
def test_components_have_the_published_parameter_counts(family):
    assert count_parameters(family) == PUBLISHED_PARAMETERS[family]


@pytest.mark.parametrize("family", FULL_SIZE_FAMILIES)
def test_each_family_is_the_pipeline_its_tiny_twin_is(family):
    assert PIPELINE_CLASSES[family] == FAMILY_INFO[family].pipeline_class
    components = PUBLISHED_CONFIGS[family]
    denoiser = (components.get("unet") or components["transformer"])[1]
    # The default image side is the denoiser's sample size times the VAE's factor 8, as on the hub.
    assert denoiser["sample_size"] * 8 == components["vae"][1]["sample_size"]
    assert denoiser["in_channels"] == components["vae"][1]["latent_channels"]
    if FAMILY_INFO[family].scheduler_kind == "discrete":
        prediction = components["scheduler"][1].get("prediction_type", "epsilon")
        assert prediction == ("v_prediction" if family == "sd2-v" else "epsilon")


def test_sdxl_unet_takes_both_encoders_hidden_states_and_the_pooled_projection():
    components = PUBLISHED_CONFIGS["sdxl"]
    first, second = components["text_encoder"][1], components["text_encoder_2"][1]
    unet = components["unet"][1]
    assert unet["cross_attention_dim"] == first["hidden_size"] + second["hidden_size"]
    assert unet["projection_class_embeddings_input_dim"] == second["projection_dim"] + 6 * unet["addition_time_embed_dim"]


def test_sd3_is_built_without_t5_and_its_transformer_takes_both_clips():
    components = PUBLISHED_CONFIGS["sd3"]
    assert "text_encoder_3" not in components and "tokenizer_3" not in components
    first, second = components["text_encoder"][1], components["text_encoder_2"][1]
    transformer = components["transformer"][1]
    # The pooled projections of both CLIPs, concatenated; their hidden states (768 + 1280) are zero-padded to
    # the T5 width the transformer was trained with, which is what diffusers does when text_encoder_3 is None.
    assert transformer["pooled_projection_dim"] == first["projection_dim"] + second["projection_dim"]
    assert transformer["joint_attention_dim"] == 4096 > first["hidden_size"] + second["hidden_size"]


def test_clip_vocabulary_from_a_bpe_file_tokenizes_with_its_merges(tmp_path):
    from transformers import CLIPTokenizer

    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    bpe = gzip.compress(("\"bpe_simple_vocab_16e6.txt#version: 0.2\n" + "\n".join(merges) + "\n").encode())
    vocab, kept = clip_vocabulary(bpe)
    assert kept == merges
    assert len(vocab) == 512 + len(merges) + 2
    assert vocab["cat</w>"] == 512 + 1 and vocab["<|endoftext|>"] == len(vocab) - 1
    write_clip_tokenizer(tmp_path, (vocab, kept), pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    ids = tokenizer("a cat, a dog").input_ids
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"]
    assert vocab["cat</w>"] in ids and vocab["dog</w>"] in ids
    assert tokenizer.pad_token_id == vocab["!"] and tokenizer.model_max_length == 77


def test_full_size_goes_with_tiny_and_a_published_family(capsys):
    assert parse_arguments(["--tiny", "--full-size", "--family", "sdxl"]).full_size
    for argv, message in ((["--model-dir", "x", "--full-size"], "--full-size goes with --tiny"),
                          (["--tiny", "--full-size", "--family", "flux"], "--full-size exists for the families")):
        with pytest.raises(SystemExit):
            parse_arguments(argv)
        assert message in capsys.readouterr().err
