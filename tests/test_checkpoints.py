"""build_mar.sh --checkpoint: single-file checkpoints in the original layout converted back into diffusers.

The checkpoints are written from the tiny pipelines by builder/original_layout.py (diffusers -> LDM/SGM keys),
so each conversion must give back exactly the weights the pipeline started with; the serving test checks the
archive built from a checkpoint answers with the same image as the one built from the folder.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO_ROOT
from helpers import SMALL, npy, png_base64, predict, run_build_mar, solid, stop_server, write_model_config

FAMILIES = {"sd1": "sd1", "sd2-v": "sd2", "sdxl": "sdxl"}  # tiny family -> detected checkpoint family


def build_mar(*arguments, **env):
    return subprocess.run([str(REPO_ROOT / "build_mar.sh"), *map(str, arguments)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", **env})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (the tiny pipeline's folder, its original-layout checkpoint)."""
    from builder.original_layout import write_original_checkpoint
    from builder.tiny_pipeline import build_tiny_pipeline

    work = tmp_path_factory.mktemp("checkpoints")
    made = {}
    for family in FAMILIES:
        pipeline = build_tiny_pipeline(work / f"tiny-{family}", family)
        made[family] = (work / f"tiny-{family}",
                        write_original_checkpoint(pipeline, family, work / f"{family}-civitai.safetensors"))
    return made


@pytest.mark.parametrize("family", FAMILIES)
def test_a_checkpoint_converts_back_into_the_exact_weights_of_its_folder(checkpoints, family, tmp_path):
    from diffusers import DiffusionPipeline

    from builder.checkpoints import convert_checkpoint, detect_family
    from handler.model.weight_files import read_header

    folder, checkpoint = checkpoints[family]
    assert detect_family(read_header(checkpoint), checkpoint) == FAMILIES[family]
    messages = []
    converted = convert_checkpoint(checkpoint, str(folder), tmp_path / "converted", tmp_path / "downloads",
                                   messages.append)
    assert any("converting" in message for message in messages)  # progress is shown
    original, back = (DiffusionPipeline.from_pretrained(path, local_files_only=True) for path in (folder, converted))
    assert type(back) is type(original)
    assert back.scheduler.config == original.scheduler.config  # v-prediction kept from the layout
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(original, name, None) is None:
            continue
        expected, actual = getattr(original, name).state_dict(), getattr(back, name).state_dict()
        assert set(actual) == set(expected), name
        assert all(torch.equal(actual[key], expected[key]) for key in expected), name


def test_a_checkpoint_of_another_family_than_the_layout_is_refused(checkpoints, tmp_path):
    result = build_mar("--checkpoint", checkpoints["sd1"][1], "--config-from", checkpoints["sdxl"][0],
                       "--export-path", tmp_path / "store", "--work-dir", tmp_path / "work")
    assert result.returncode != 0
    assert "sd1 checkpoint (a StableDiffusionPipeline)" in result.stderr
    assert "is a StableDiffusionXLPipeline" in result.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_a_layout_of_another_geometry_is_refused_naming_the_key_and_shapes(checkpoints, tmp_path):
    import shutil

    layout = tmp_path / "layout"
    shutil.copytree(checkpoints["sd1"][0], layout)
    config = json.loads((layout / "unet" / "config.json").read_text())
    (layout / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 768}))
    result = build_mar("--checkpoint", checkpoints["sd1"][1], "--config-from", layout,
                       "--export-path", tmp_path / "store", "--work-dir", tmp_path / "work")
    assert result.returncode != 0
    assert "attn2.to_k.weight has shape [64, 32]" in result.stderr
    assert "unet/config.json has cross_attention_dim 768" in result.stderr


def test_without_config_from_offline_the_error_says_the_hub_is_needed(checkpoints, tmp_path):
    result = build_mar("--checkpoint", checkpoints["sdxl"][1], "--export-path", tmp_path / "store",
                       "--work-dir", tmp_path / "work")
    assert result.returncode != 0
    assert "stabilityai/stable-diffusion-xl-base-1.0" in result.stderr
    assert "needs the Hugging Face hub at build time" in result.stderr and "--config-from DIR" in result.stderr


def test_a_checkpoint_of_no_family_is_refused_with_what_was_looked_for(tmp_path):
    path = tmp_path / "mystery.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2), "decoder.bias": torch.zeros(2)}, path)
    result = build_mar("--checkpoint", path, "--export-path", tmp_path / "store", "--work-dir", tmp_path / "work")
    assert result.returncode != 0
    assert "matches no supported family" in result.stderr
    assert "cond_stage_model.transformer" in result.stderr and "decoder.bias" in result.stderr


def test_an_inpainting_checkpoint_is_refused_naming_its_input_channels(tmp_path):
    path = tmp_path / "inpainting.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}, path)
    result = build_mar("--checkpoint", path, "--export-path", tmp_path / "store", "--work-dir", tmp_path / "work")
    assert result.returncode != 0
    assert "[32, 9, 3, 3]" in result.stderr and "9 input channels" in result.stderr


def test_config_from_goes_with_checkpoint(tmp_path):
    result = build_mar("--tiny", "--config-from", tmp_path)
    assert result.returncode != 0 and "--config-from goes with --checkpoint" in result.stderr


@pytest.mark.serving
def test_each_checkpoint_serves_the_image_of_its_folder(checkpoints, tmp_path):
    from harness.local_server import LocalTorchServe

    from builder.tiny_ip_adapter import build_tiny_ip_adapter

    store = tmp_path / "store"
    config = write_model_config(tmp_path / "model-config.yaml", handler_settings={"warmup": False})
    models = {}
    for family, (folder, checkpoint) in checkpoints.items():
        name = family.replace("-", "_")
        run_build_mar("--model-dir", folder, "--name", f"{name}_folder", "--archive-format", "no-archive",
                      "--config-file", config, "--export-path", store, "--work-dir", tmp_path / "work")
        extras = []
        if family == "sd1":  # a zipped .mar that also carries an embedding and an IP-Adapter, unused here
            save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
                      tmp_path / "castlestyle.safetensors")
            extras = ["--embedding", f"castlestyle={tmp_path / 'castlestyle.safetensors'}", "--ip-adapter",
                      f"style={build_tiny_ip_adapter(folder, tmp_path / 'ip-adapter')}"]
        run_build_mar("--checkpoint", checkpoint, "--config-from", folder, "--name", f"{name}_checkpoint",
                      "--archive-format", "zip" if extras else "no-archive", "--config-file", config,
                      "--export-path", store, "--work-dir", tmp_path / "work", *extras)
        models.update({f"{name}_folder": f"{name}_folder",
                       f"{name}_checkpoint": f"{name}_checkpoint" + (".mar" if extras else "")})
    server = LocalTorchServe(tmp_path / "server", store, models)
    server.start(timeout=600)
    try:
        body = {"prompt": "a castle on a hill", "seed": 3, "output_format": "npy", **SMALL}
        for family in checkpoints:
            name = family.replace("-", "_")
            from_folder = npy(predict(server, body, model=f"{name}_folder"))
            from_checkpoint = npy(predict(server, body, model=f"{name}_checkpoint"))
            assert from_folder.std() > 0, family
            np.testing.assert_array_equal(from_checkpoint, from_folder, err_msg=family)
        styled = npy(predict(server, {**body, "prompt": "a castle on a hill, by castlestyle"}, model="sd1_checkpoint"))
        image_prompted = npy(predict(server, {**body, "ip_adapter": "style", "ip_adapter_image": png_base64(
            solid(64, 64, 200))}, model="sd1_checkpoint"))
        plain = npy(predict(server, body, model="sd1_checkpoint"))
        assert not np.array_equal(styled, plain) and not np.array_equal(image_prompted, plain)
    finally:
        stop_server(server)
