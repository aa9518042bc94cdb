"""``build_mar.sh --controlnet NAME=FOLDER``: check diffusers ControlNet folders against the base pipeline and
stage them into the archive.

A ControlNet adds its outputs to the denoiser's own blocks, so it fits a pipeline only if its geometry equals
the denoiser's (block widths and cross-attention width for a UNet; input, text and inner widths for Flux's
transformer). This is checked here from the config files alone, so a wrong-family ControlNet fails the build
with the folder and the mismatch named, never a request at serving time.
"""

import json
import os
import re
import shutil
from pathlib import Path

from handler.model.weight_files import WeightFileError, check_weights_in

# The fields of a UNet ControlNet's config that must equal its UNet's, and of a Flux one's (the inner width
# num_attention_heads x attention_head_dim is compared too).
UNET_FIELDS = ("in_channels", "block_out_channels", "cross_attention_dim", "addition_embed_type",
               "projection_class_embeddings_input_dim")
FLUX_FIELDS = ("in_channels", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
STAGED_FOLDER = "controlnets"  # handler/model/controlnets.py reads it there


class ControlNetError(ValueError):
    """A --controlnet argument or folder that does not fit the archive's pipeline."""


def parse_controlnet_argument(text: str) -> tuple[str, Path]:
    """``NAME=FOLDER`` -> (name, folder)."""
    name, separator, folder = text.partition("=")
    if not separator or not folder:
        raise ControlNetError(f"--controlnet takes NAME=FOLDER, got {text!r}")
    if not NAME.fullmatch(name):
        raise ControlNetError(f"--controlnet name must be letters, digits, '.', '_' and '-', starting with a letter "
                              f"or digit; got {name!r}")
    return name, Path(folder)


def check_controlnet(name: str, folder: Path, pipeline_folder: Path) -> str:
    """Raise ControlNetError unless ``folder`` holds a ControlNet that fits the pipeline; returns its class."""
    from handler.core.controlnets import CONTROLNET_MODELS

    where = f"ControlNet {name} ({folder})"
    config = _config(folder / "config.json", where)
    pipeline_class = _config(pipeline_folder / "model_index.json", "the pipeline").get("_class_name")
    expected = CONTROLNET_MODELS.get(pipeline_class)
    if expected is None:
        raise ControlNetError(f"{where}: ControlNets are served for {sorted(CONTROLNET_MODELS)}, not for "
                              f"{pipeline_class}")
    class_name = config.get("_class_name")
    if class_name != expected:
        raise ControlNetError(f"{where} is a {class_name}; a {pipeline_class} takes a {expected}")
    try:
        check_weights_in(folder, where)
    except WeightFileError as error:
        raise ControlNetError(str(error)) from None
    if not any(folder.glob("*.safetensors")):
        raise ControlNetError(f"{where} has no .safetensors weights (only safetensors are packed: pickled .bin "
                              "weights could run code when loaded)")
    denoiser = "unet" if expected == "ControlNetModel" else "transformer"
    base = _config(pipeline_folder / denoiser / "config.json", f"the pipeline's {denoiser}")
    for field in UNET_FIELDS if denoiser == "unet" else FLUX_FIELDS:
        if _normalised(config.get(field)) != _normalised(base.get(field)):
            raise ControlNetError(f"{where} does not fit this {pipeline_class}: its {field} is "
                                  f"{config.get(field)!r} but the {denoiser}'s is {base.get(field)!r} (a ControlNet "
                                  "of another family or size)")
    if denoiser == "transformer":
        width, base_width = (item["num_attention_heads"] * item["attention_head_dim"] for item in (config, base))
        if width != base_width:
            raise ControlNetError(f"{where} does not fit this {pipeline_class}: its inner width is {width} but the "
                                  f"transformer's is {base_width}")
    return class_name


def stage_controlnets(arguments: list[str], pipeline_folder: Path, staging: Path, progress) -> list[str]:
    """Check every ``--controlnet`` argument and copy its folder to ``staging/controlnets/NAME``; the names."""
    parsed = [parse_controlnet_argument(text) for text in arguments]
    names = [name for name, _ in parsed]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ControlNetError(f"--controlnet names must differ; given more than once: {duplicates}")
    for number, (name, folder) in enumerate(parsed, start=1):
        if not folder.is_dir():
            raise ControlNetError(f"ControlNet {name}: {folder} is not a folder (pass a diffusers ControlNet folder, "
                                  "as written by save_pretrained)")
        class_name = check_controlnet(name, folder, pipeline_folder)
        target = staging / STAGED_FOLDER / name
        target.mkdir(parents=True)
        files = sorted(path for path in folder.iterdir()
                       if path.is_file() and not path.name.startswith(".") and path.suffix in (".json", ".safetensors"))
        for path in files:
            shutil.copyfile(path, target / path.name)
            os.chmod(target / path.name, 0o644)
        progress(f"  ControlNet {number}/{len(parsed)} {name}: a fitting {class_name}, {len(files)} files staged")
    return names


def _config(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ControlNetError(f"{what} has no {path.name} ({path})") from None
    except (OSError, ValueError) as error:
        raise ControlNetError(f"{what}: {path} is not readable JSON ({error})") from None


def _normalised(value):
    """Lists and tuples compare alike (JSON keeps tuples as lists)."""
    return list(value) if isinstance(value, (list, tuple)) else value
