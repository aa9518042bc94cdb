"""Pickles are never unpickled, and a .safetensors file whose header lies is refused before a tensor is read.

The pickles here are traps: loading one would create a marker file (``open(marker, "w")`` runs during
unpickling). A build given one must fail, say why and how to convert it, and leave no marker behind.
"""

import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO_ROOT
from handler.model.weight_files import PICKLE_SUFFIXES, WeightFileError, check_safetensors, read_header


class Trap:
    """Unpickling this calls ``open(marker, "w")``: the marker's existence proves a load happened."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_trap(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": Trap(marker)}, handle)
    return path


def build_mar(*arguments):
    return subprocess.run([str(REPO_ROOT / "build_mar.sh"), *map(str, arguments)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"})


def test_the_trap_does_run_code_when_unpickled(tmp_path):
    """The trap is real: unpickling it (here, on purpose) writes its marker."""
    trap = write_trap(tmp_path / "proof.ckpt", tmp_path / "proof-marker")
    with open(trap, "rb") as handle:
        pickle.load(handle)
    assert (tmp_path / "proof-marker").exists()


@pytest.mark.parametrize("option", ["--lora", "--checkpoint", "--embedding", "--ip-adapter"])
@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_a_pickle_file_is_refused_unopened_with_the_reason_and_the_conversion(tmp_path, option, suffix):
    marker = tmp_path / "marker"
    trap = write_trap(tmp_path / f"style{suffix}", marker)
    arguments = {"--lora": ["--tiny", "--lora", f"style={trap}"], "--checkpoint": ["--checkpoint", trap],
                 "--embedding": ["--tiny", "--embedding", f"style={trap}"],
                 "--ip-adapter": ["--tiny", "--ip-adapter", f"style={trap}"]}[option]
    result = build_mar(*arguments, "--export-path", tmp_path / "store", "--work-dir", tmp_path / "work")
    assert result.returncode != 0
    assert "arbitrary code" in result.stderr and "CVE-2025-32434" in result.stderr
    assert "safetensors" in result.stderr and "trust" in result.stderr
    assert not marker.exists()


def _tiny_folder_with_a_trap(tmp_path, component: str, trap_name: str):
    """A copy of the tiny sd1 pipeline (or one of its components) whose weights were replaced by a trap."""
    from builder.tiny_pipeline import build_tiny_pipeline

    pipeline = tmp_path / "pipeline"
    build_tiny_pipeline(pipeline, "sd1")
    folder = pipeline / component if component else pipeline
    target = pipeline / (component or "unet")
    for weights in target.glob("*.safetensors"):
        weights.unlink()
    write_trap(target / trap_name, tmp_path / "marker")
    return pipeline, folder


@pytest.mark.parametrize("option", ["--model-dir", "--vae", "--controlnet", "--translator"])
def test_pickled_weights_in_a_folder_are_refused_unopened(tmp_path, option):
    marker = tmp_path / "marker"
    if option == "--model-dir":
        pipeline, _ = _tiny_folder_with_a_trap(tmp_path, "", "diffusion_pytorch_model.bin")
        arguments = ["--model-dir", pipeline]
    elif option == "--vae":
        _, vae = _tiny_folder_with_a_trap(tmp_path, "vae", "diffusion_pytorch_model.bin")
        arguments = ["--tiny", "--vae", vae]
    elif option == "--controlnet":
        controlnet = tmp_path / "controlnet"
        controlnet.mkdir()
        (controlnet / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
        write_trap(controlnet / "diffusion_pytorch_model.bin", marker)
        arguments = ["--tiny", "--controlnet", f"edges={controlnet}"]
    else:
        translator = tmp_path / "opus-mt"
        translator.mkdir()
        (translator / "config.json").write_text("{}")
        write_trap(translator / "pytorch_model.bin", marker)
        arguments = ["--tiny", "--translator", translator]
    result = build_mar(*arguments, "--export-path", tmp_path / "store", "--work-dir", tmp_path / "work")
    assert result.returncode != 0
    assert "arbitrary code" in result.stderr and "CVE-2025-32434" in result.stderr, result.stderr
    assert not marker.exists()
    assert not (tmp_path / "store" / "stable_diffusion.mar").exists()


# --- safetensors headers ----------------------------------------------------------------------------------------

def write_raw(path, header: dict, data: bytes, length=None):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + data)
    return path


def test_a_valid_file_passes_with_its_header(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float16)}, path, metadata={"format": "pt"})
    header = check_safetensors(path)
    assert header["a"]["shape"] == [2, 3] and header["b"]["dtype"] == "F16"
    assert "__metadata__" not in header


@pytest.mark.parametrize("header, data, length, reason", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 2**40, "more than"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**6, "but the file holds"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}}, b"\0" * 8, None, "needs 8 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "ends at byte 8"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "gap"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "non-negative"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "expected [begin, end]"),
    ({"a": [1, 2]}, b"", None, "exactly dtype, shape and data_offsets"),
    ({"__metadata__": {"n": 1}}, b"", None, "__metadata__"),
])
def test_a_lying_header_is_refused_naming_the_lie(tmp_path, header, data, length, reason):
    path = write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(WeightFileError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        read_header(path)


def test_a_header_that_is_not_json_or_not_safetensors_at_all_is_refused(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(WeightFileError, match="not JSON"):
        read_header(garbage)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(WeightFileError, match="shorter than"):
        read_header(short)
    disguised = write_trap(tmp_path / "disguised.safetensors", tmp_path / "marker")  # a pickle renamed
    with pytest.raises(WeightFileError):
        read_header(disguised)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_every_pickle_suffix_is_refused_without_opening(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    write_trap(path, tmp_path / "marker")
    with pytest.raises(WeightFileError, match="pickle"):
        check_safetensors(path)
    assert not (tmp_path / "marker").exists()
