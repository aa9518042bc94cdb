"""Weights stored in the served dtype are mapped from the archive's files, not copied, so workers share them.

Checked on the real loader: a UNet parameter's memory lies inside a mapping of its safetensors file (what makes
the page cache hold it once for every worker) when the dtype on disk is the served one, and not otherwise.
"""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import run_build_mar
from handler.core.settings import HandlerSettings
from handler.model.device import Placement
from handler.model.loading import load_pipeline


def mapped_file(tensor: torch.Tensor) -> str:
    """The file whose mapping holds ``tensor``'s memory in this process, or '' for anonymous memory."""
    address = tensor.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        start, end = (int(value, 16) for value in parts[0].split("-"))
        if start <= address < end:
            return parts[5] if len(parts) > 5 else ""
    return ""


@pytest.fixture(scope="module")
def bfloat16_pipeline(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("bf16")
    run_build_mar("--tiny", "--weights-dtype", "bfloat16", "--archive-format", "no-archive",
                  "--export-path", work / "store", "--work-dir", work / "scratch")
    return work / "store" / "stable_diffusion" / "pipeline"


def test_the_archive_holds_the_weights_in_the_chosen_dtype(bfloat16_pipeline):
    files = sorted(bfloat16_pipeline.rglob("*.safetensors"))
    assert files
    for path in files:
        with safe_open(str(path), framework="pt") as weights:
            dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
        assert dtypes <= {"BF16", "I64"}, (path, dtypes)
    assert not (bfloat16_pipeline.parent.parent.parent / "scratch" / "converted-stable_diffusion").exists()


@pytest.mark.parametrize("served, mapped", [(torch.bfloat16, True), (torch.float32, False)])
def test_weights_in_the_served_dtype_are_mapped_from_the_file(bfloat16_pipeline, served, mapped):
    pipeline = load_pipeline(bfloat16_pipeline, Placement("cpu", served), HandlerSettings())
    weight = pipeline.unet.conv_in.weight
    assert weight.dtype == served
    unet_file = str(bfloat16_pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    assert (mapped_file(weight) == unet_file) == mapped
