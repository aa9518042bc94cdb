"""``build_mar.sh --ip-adapter NAME=DIR``: check IP-Adapters against the pipeline and stage them as
``ip_adapters/NAME/ip-adapter.safetensors`` with their ``image_encoder/`` (handler/model/ip_adapters.py).

DIR is an IP-Adapter as h94/IP-Adapter ships one: a folder holding one ``.safetensors`` adapter file and the
``image_encoder/`` it was trained with (or the adapter file itself, with ``image_encoder/`` beside it). Each is
loaded into the pipeline here, so one for another family or size fails the build, naming the file; all of an
archive's IP-Adapters must share one image encoder (diffusers loads one for all of them).
"""

import json
import os
import re
import shutil
from pathlib import Path

from handler.model.ip_adapters import IMAGE_ENCODER, PACKAGED_FOLDER, WEIGHTS
from handler.model.weight_files import WeightFileError, check_safetensors, check_weights_in

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class IpAdapterError(ValueError):
    """An --ip-adapter argument or folder that build_mar refuses; the message says which and why."""


def parse_ip_adapter_argument(text: str) -> tuple[str, Path, Path]:
    """``NAME=DIR`` (or ``NAME=FILE``) -> (name, adapter weights file, image encoder folder)."""
    name, separator, location = text.partition("=")
    if not separator or not location:
        raise IpAdapterError(f"--ip-adapter takes NAME=DIR (e.g. --ip-adapter face=IP-Adapter/models), got {text!r}")
    if not NAME.fullmatch(name):
        raise IpAdapterError(f"--ip-adapter name must be letters, digits, '.', '_' and '-', starting with a letter "
                             f"or digit; got {name!r}")
    location = Path(location)
    if location.is_dir():
        candidates = sorted(location.glob("*.safetensors"))
        if len(candidates) != 1:
            raise IpAdapterError(f"--ip-adapter {text}: {location} holds {len(candidates)} .safetensors files; "
                                 "pass the adapter file itself (NAME=DIR/ip-adapter_sd15.safetensors)")
        weights, folder = candidates[0], location
    else:
        weights, folder = location, location.parent
    try:
        check_safetensors(weights, f"--ip-adapter {name}")
        check_weights_in(folder / IMAGE_ENCODER, f"--ip-adapter {name} image encoder")
    except WeightFileError as error:
        raise IpAdapterError(str(error)) from None
    if not (folder / IMAGE_ENCODER / "config.json").is_file():
        raise IpAdapterError(f"--ip-adapter {text}: no {IMAGE_ENCODER}/config.json beside {weights.name} (the CLIP "
                             "vision model the adapter was trained with, as h94/IP-Adapter ships it)")
    return name, weights, folder / IMAGE_ENCODER


def stage_ip_adapters(arguments: list[str], pipeline_folder: Path, staging: Path, progress) -> list[str]:
    """Check every ``--ip-adapter`` against the pipeline, then copy it into ``staging/ip_adapters/NAME``."""
    parsed = [parse_ip_adapter_argument(text) for text in arguments]
    names = [name for name, _, _ in parsed]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise IpAdapterError(f"--ip-adapter names must differ; given more than once: {repeated}")
    encoders = {name: _encoder_config(encoder) for name, _, encoder in parsed}
    first = names[0]
    for name in names[1:]:
        if encoders[name] != encoders[first]:
            raise IpAdapterError(f"--ip-adapter {name} uses another image encoder than {first}; the IP-Adapters of "
                                 "one archive share one image encoder: build them into separate archives")
    for name, weights, encoder in parsed:
        target = staging / PACKAGED_FOLDER / name
        (target / IMAGE_ENCODER).mkdir(parents=True)
        shutil.copyfile(weights, target / WEIGHTS)
        for path in sorted(encoder.iterdir()):
            if path.is_file() and path.suffix in (".json", ".safetensors"):
                shutil.copyfile(path, target / IMAGE_ENCODER / path.name)
        for path in target.rglob("*"):
            if path.is_file():
                os.chmod(path, 0o644)
    _check_loads(pipeline_folder, {name: staging / PACKAGED_FOLDER / name for name in names}, progress)
    return names


def _check_loads(pipeline_folder: Path, folders: dict[str, Path], progress) -> None:
    """Load each staged IP-Adapter into the pipeline, so one that does not fit fails the build here."""
    import torch
    from diffusers import DiffusionPipeline

    from handler.model.pipeline_index import null_components

    progress(f"checking {len(folders)} IP-Adapter(s) against {pipeline_folder} (loading the pipeline in bfloat16)")
    pipeline = DiffusionPipeline.from_pretrained(pipeline_folder, local_files_only=True, dtype=torch.bfloat16,
                                                 **null_components(pipeline_folder))
    if not hasattr(pipeline, "load_ip_adapter") or getattr(pipeline, "unet", None) is None:
        raise IpAdapterError(f"{type(pipeline).__name__} takes no UNet IP-Adapters here (SD 1.x/2.x and SDXL do)")
    for name, folder in folders.items():
        try:
            pipeline.load_ip_adapter(str(folder), subfolder="", weight_name=WEIGHTS, image_encoder_folder=IMAGE_ENCODER,
                                     local_files_only=True)
        except Exception as error:
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:600]
            raise IpAdapterError(f"--ip-adapter {name} does not fit {type(pipeline).__name__} (an IP-Adapter for "
                                 f"another family?): {reason}") from None
        pipeline.unload_ip_adapter()
        progress(f"  IP-Adapter {name} fits")


def _encoder_config(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return {key: value for key, value in config.items() if not key.startswith("_") and key != "transformers_version"}
