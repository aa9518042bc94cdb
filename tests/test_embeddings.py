"""Textual-inversion embeddings: packed by build_mar.sh --embedding (or read from embedding_dir), used by name in a
prompt or negative prompt with every prompt_syntax, listed in capabilities, refused at build time where they
cannot fit. The handler runs in-process on tiny pipelines whose embeddings are random vectors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO_ROOT, make_context, set_requests

SMALL = {"num_inference_steps": 2, "width": 64, "height": 64, "seed": 5, "output_format": "array"}
SYNTAXES = ("plain", "a1111", "compel")


def a1111_embedding(path, vectors: int, width: int = 32, seed: int = 0):
    """AUTOMATIC1111's .safetensors form: ``emb_params`` [vectors, width]."""
    generator = torch.Generator().manual_seed(seed)
    save_file({"emb_params": torch.randn(vectors, width, generator=generator)}, path)
    return path


def diffusers_embedding(path, token: str = "<trained-token>", width: int = 32, seed: int = 1):
    """diffusers' save_textual_inversion form: the token it was trained as -> one vector."""
    generator = torch.Generator().manual_seed(seed)
    save_file({token: torch.randn(width, generator=generator)}, path)
    return path


def sdxl_embedding(path, vectors: int = 2, seed: int = 2):
    """SDXL's pair: vectors for each of its two text encoders (32 wide each in the tiny SDXL)."""
    generator = torch.Generator().manual_seed(seed)
    save_file({"clip_l": torch.randn(vectors, 32, generator=generator),
               "clip_g": torch.randn(vectors, 32, generator=generator)}, path)
    return path


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    from builder.tiny_pipeline import build_tiny_pipeline

    work = tmp_path_factory.mktemp("embeddings")
    for family in ("sd1", "sdxl"):
        build_tiny_pipeline(work / family, family)
    files = {"castlestyle": a1111_embedding(work / "castlestyle.safetensors", vectors=3),
             "badhands": diffusers_embedding(work / "badhands.safetensors"),
             "xlstyle": sdxl_embedding(work / "xlstyle.safetensors")}
    return work, files


def model_dir(work, family: str, embeddings: list[str], files: dict, name: str):
    """A model folder as a no-archive build lays it out: pipeline/ and embeddings/ staged by the builder."""
    from builder.embeddings import stage_embeddings

    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(work / family, folder / "pipeline")
    stage_embeddings([f"{embedding}={files[embedding]}" for embedding in embeddings], folder / "pipeline", folder,
                     lambda message: None)
    return folder


def handler_for(folder, **settings):
    from handler.stable_diffusion_handler import StableDiffusionHandler

    handler = StableDiffusionHandler()
    context = make_context(folder, {"warmup": False, **settings})
    handler.initialize(context)
    return handler, context


def image(handler, context, **fields):
    set_requests(context, [{"Content-Type": "application/json"}])
    body = handler.handle([{"body": json.dumps({**SMALL, **fields}).encode()}], context)[0]
    return np.array(json.loads(body), dtype="uint8")


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_sd1_embeddings_change_the_image_only_when_named(pipelines, syntax, tmp_path):
    work, files = pipelines
    with_embeddings = model_dir(work, "sd1", ["castlestyle"], files, f"sd1-{syntax}")
    embedding_dir = tmp_path / "mounted"
    embedding_dir.mkdir()
    shutil.copy(files["badhands"], embedding_dir / "badhands.safetensors")  # the operator's folder
    handler, context = handler_for(with_embeddings, prompt_syntax=syntax, embedding_dir=str(embedding_dir))
    plain, _ = handler_for(model_dir(work, "sd1", [], files, f"sd1-none-{syntax}"), prompt_syntax=syntax)
    capabilities = json.loads(handler.describe_handle())["capabilities"]
    assert capabilities["embeddings"] == ["badhands", "castlestyle"]

    if syntax == "a1111":  # a 3-vector embedding is read as its 3 tokens
        tokenizer = handler.service.engine.pipeline.tokenizer
        added = tokenizer.convert_tokens_to_ids(["castlestyle", "castlestyle_1", "castlestyle_2"])
        ids = handler.service.engine.prompt_encoder.chunks("by castlestyle")[0][0].ids
        assert [token for token in ids if token in added] == added

    castle = image(handler, context, prompt="a castle")
    np.testing.assert_array_equal(castle, image(plain, context, prompt="a castle"))  # unnamed: no effect
    styled = image(handler, context, prompt="a castle, by castlestyle")
    assert not np.array_equal(styled, castle)
    negative = image(handler, context, prompt="a castle", negative_prompt="badhands")
    assert not np.array_equal(negative, image(handler, context, prompt="a castle", negative_prompt="bad"))


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_an_sdxl_pair_changes_the_image_only_when_named(pipelines, syntax):
    work, files = pipelines
    handler, context = handler_for(model_dir(work, "sdxl", ["xlstyle"], files, f"sdxl-{syntax}"),
                                   prompt_syntax=syntax)
    plain, _ = handler_for(model_dir(work, "sdxl", [], files, f"sdxl-none-{syntax}"), prompt_syntax=syntax)
    assert json.loads(handler.describe_handle())["capabilities"]["embeddings"] == ["xlstyle"]
    castle = image(handler, context, prompt="a castle")
    np.testing.assert_array_equal(castle, image(plain, context, prompt="a castle"))
    assert not np.array_equal(image(handler, context, prompt="a castle, by xlstyle"), castle)
    assert not np.array_equal(image(handler, context, prompt="a castle", negative_prompt="xlstyle"),
                              image(handler, context, prompt="a castle", negative_prompt=""))


def test_an_embedding_dir_file_that_does_not_fit_is_skipped_and_the_model_serves(pipelines, tmp_path):
    work, files = pipelines
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    a1111_embedding(mounted / "wide.safetensors", vectors=1, width=768)  # an SD 1.5 embedding for a 32-wide model
    shutil.copy(files["badhands"], mounted / "badhands.safetensors")
    handler, context = handler_for(model_dir(work, "sd1", [], files, "sd1-mounted"), embedding_dir=str(mounted))
    assert json.loads(handler.describe_handle())["capabilities"]["embeddings"] == ["badhands"]


def build_mar(*arguments):
    return subprocess.run([str(REPO_ROOT / "build_mar.sh"), *map(str, arguments)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("family, argument, reason", [
    ("sd1", "a={castlestyle}", "clashes with the token 'a'"),
    ("sd1", "wide={wide}", "vectors are 768 wide but the text encoder's are 32"),
    ("sd1", "pair={xlstyle}", "holds an SDXL pair (clip_l, clip_g); this pipeline needs vectors for one"),
    ("sdxl", "single={castlestyle}", "this pipeline needs an SDXL pair"),
    ("sd1", "two={two}", "no embedding format read here"),
    ("sd1", "(bad)={castlestyle}", "must be a letter then letters"),
])
def test_an_embedding_that_cannot_fit_is_refused_at_build_time(pipelines, tmp_path, family, argument, reason):
    work, files = pipelines
    paths = {**files, "wide": a1111_embedding(tmp_path / "wide.safetensors", 1, width=768)}
    save_file({"one": torch.zeros(2, 32), "other": torch.zeros(2, 32)}, tmp_path / "two.safetensors")
    paths["two"] = tmp_path / "two.safetensors"
    result = build_mar("--model-dir", work / family, "--embedding", argument.format(**paths),
                       "--export-path", tmp_path / "store", "--work-dir", tmp_path / "work")
    assert result.returncode != 0
    assert reason in result.stderr, result.stderr
    assert not (tmp_path / "store" / "stable_diffusion.mar").exists()
