"""Build-time checks of what build_mar.sh adds to a pipeline: LoRA files (--lora) and a replacement VAE (--vae).

A file that does not fit the base model must be refused here, naming the file and why, never at request time:
each LoRA is actually loaded into the base pipeline (diffusers converts kohya files on the way), and the VAE's
class and latent channels must be the ones the pipeline's other components expect.
"""

import json
from pathlib import Path

from handler.model.adapters import LORA_SUFFIX, LoraError, check_lora, check_name
from handler.model.pipeline_index import null_components
from handler.model.weight_files import WeightFileError, check_safetensors, check_weights_in

VAE_FOLDER = "vae"
VAE_CONFIG = "config.json"


class ComponentError(SystemExit):
    """A --lora or --vae that build_mar refuses; the message says which file and why."""

    def __init__(self, message: str):
        super().__init__(f"build_mar: {message}")


def parse_lora_argument(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` -> (name, path), refusing a bad name, a missing file or a file that is not safetensors."""
    name, separator, path = text.partition("=")
    if not separator or not path:
        raise ComponentError(f"--lora takes NAME=PATH (e.g. --lora pixel-art=/loras/pixel.safetensors), got {text!r}")
    try:
        check_name(name)
    except LoraError as error:
        raise ComponentError(f"--lora {text}: {error}") from None
    path = Path(path)
    if not path.is_file():
        raise ComponentError(f"--lora {text}: {path} is not a {LORA_SUFFIX} file (diffusers/PEFT or kohya format)")
    try:
        check_safetensors(path, f"--lora {name}")
    except WeightFileError as error:
        raise ComponentError(str(error)) from None
    return name, path


def check_loras(folder: Path, loras: list[tuple[str, Path]], progress) -> None:
    """Load each LoRA into the pipeline in ``folder``; raise ComponentError for the first that does not fit."""
    import torch
    from diffusers import DiffusionPipeline

    names = [name for name, _ in loras]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ComponentError(f"--lora names must be unique; given more than once: {repeated}")
    progress(f"checking {len(loras)} LoRA file(s) against {folder} (loading the pipeline in bfloat16)")
    pipeline = DiffusionPipeline.from_pretrained(folder, local_files_only=True, dtype=torch.bfloat16,
                                                 **null_components(folder))
    if not hasattr(pipeline, "load_lora_weights"):
        raise ComponentError(f"{type(pipeline).__name__} takes no LoRA weights in diffusers; drop --lora")
    for name, path in loras:
        try:
            check_lora(pipeline, path)
        except LoraError as error:
            raise ComponentError(f"refusing --lora {name}={path}: {error}") from None
        progress(f"  LoRA {name} fits ({path})")


def check_vae(folder: Path, vae: Path) -> None:
    """A VAE folder that can replace ``folder``'s: same class, same latent channels, weights present."""
    try:
        check_weights_in(vae, "--vae")
    except WeightFileError as error:
        raise ComponentError(str(error)) from None
    if not (vae / VAE_CONFIG).is_file() or not list(vae.glob("*.safetensors")):
        raise ComponentError(f"--vae {vae}: expected a diffusers VAE folder with {VAE_CONFIG} and .safetensors "
                             "weights (as save_pretrained writes it)")
    index = json.loads((folder / "model_index.json").read_text())
    if not isinstance(index.get(VAE_FOLDER), list) or index[VAE_FOLDER][1] is None:
        raise ComponentError(f"--vae {vae}: the pipeline in {folder} has no VAE to replace")
    expected_class = index[VAE_FOLDER][1]
    ours, theirs = (json.loads((path / VAE_CONFIG).read_text()) for path in (folder / VAE_FOLDER, vae))
    if theirs.get("_class_name") != expected_class:
        raise ComponentError(f"refusing --vae {vae}: it is a {theirs.get('_class_name')}, the pipeline expects "
                             f"a {expected_class}")
    for key in ("latent_channels", "in_channels", "out_channels"):
        if ours.get(key) != theirs.get(key):
            raise ComponentError(f"refusing --vae {vae}: its {key} is {theirs.get(key)}, the pipeline's VAE has "
                                 f"{ours.get(key)} (a VAE of another model family?)")
    _load_vae(vae, expected_class)


def _load_vae(vae: Path, class_name: str) -> None:
    """Load the VAE once, so unreadable or mismatched weights are refused now rather than in every worker."""
    import diffusers

    try:
        getattr(diffusers, class_name).from_pretrained(vae, local_files_only=True)
    except Exception as error:
        raise ComponentError(f"refusing --vae {vae}: it does not load as a {class_name}: "
                             f"{type(error).__name__}: {error}") from None


def vae_entries(vae: Path) -> list[tuple[Path, str]]:
    """The replacement VAE's files as (source, path in the pipeline folder)."""
    return [(path, f"{VAE_FOLDER}/{path.name}") for path in sorted(vae.iterdir())
            if path.is_file() and not path.name.startswith(".")]
