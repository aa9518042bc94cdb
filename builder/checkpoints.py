"""``build_mar.sh --checkpoint FILE.safetensors [--config-from DIR_OR_HUB_ID]``: a single-file checkpoint (civitai,
an AUTOMATIC1111 ``models/Stable-diffusion`` folder) converted once, at build time, into a diffusers folder.

The family is read from the checkpoint's header alone (key names and shapes, no tensor loaded): which text
encoders it carries (CLIP for SD 1.x, OpenCLIP for SD 2.x, both for SDXL), SDXL's size embedding, SD3's joint
blocks, Flux's double blocks. The layout it converts into (configs, tokenizers, scheduler) is ``--config-from``
or, without it, the family's standard hub repository, whose configs alone are downloaded. The checkpoint and the
layout must agree: the pipeline class, and the shapes that fix the geometry (UNet input and cross-attention
widths, text encoder vocabulary and width, VAE channels); a disagreement names the key, its shape and the
layout's value. diffusers' ``from_single_file`` then converts with ``local_files_only=True``: components the
checkpoint carries come from it, the others (a checkpoint without text encoders, say) from the layout's weights.
Serving is unchanged: the archive carries the converted folder.
"""

import json
import re
import time
from pathlib import Path
from typing import Callable, Optional

from handler.model.weight_files import check_safetensors

# family -> (pipeline class, the standard diffusers repository of its layout)
FAMILIES = {
    "sd1": ("StableDiffusionPipeline", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "sd2": ("StableDiffusionPipeline", "stabilityai/stable-diffusion-2-1"),
    "sdxl": ("StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0"),
    "sd3": ("StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3-medium-diffusers"),
    "flux": ("FluxPipeline", "black-forest-labs/FLUX.1-dev"),
}
CONFIG_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model"]  # a layout without its weights
UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"
SDXL_SIZE_EMBEDDING = UNET + "label_emb.0.0.weight"
CLIP_TOKENS = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": "text_encoder",
               "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": "text_encoder"}
OPEN_CLIP_TOKENS = {"cond_stage_model.model.token_embedding.weight": "text_encoder",
                    "conditioner.embedders.1.model.token_embedding.weight": "text_encoder_2"}
CROSS_ATTENTION_KEY = re.compile(re.escape(UNET) + r".*\.attn2\.to_k\.weight")
DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


class CheckpointError(ValueError):
    """A checkpoint build_mar refuses; the message names the file and the keys or shapes at fault."""


def detect_family(header: dict, path: Path) -> str:
    """The family of a checkpoint from its header's keys (see the module docstring), or CheckpointError."""
    keys = set(header)

    def has(suffix: str) -> bool:
        return any(key.endswith(suffix) for key in keys)

    if has("double_blocks.0.img_attn.norm.key_norm.scale"):
        return "flux"
    if has("joint_blocks.0.context_block.adaLN_modulation.1.bias"):
        return "sd3"
    if CONV_IN in header and header[CONV_IN]["shape"][1] != 4:
        raise CheckpointError(f"{path}: {CONV_IN} has shape {header[CONV_IN]['shape']}: a UNet with "
                              f"{header[CONV_IN]['shape'][1]} input channels (an inpainting or other special "
                              "checkpoint); only text-to-image checkpoints (4 latent channels) are converted")
    if "conditioner.embedders.1.model.token_embedding.weight" in keys and SDXL_SIZE_EMBEDDING in keys:
        return "sdxl"
    if "conditioner.embedders.0.model.token_embedding.weight" in keys:
        raise CheckpointError(f"{path} is an SDXL refiner (only conditioner.embedders.0.model, OpenCLIP): the "
                              "refiner is an image-to-image second stage, not served on its own")
    if "cond_stage_model.model.token_embedding.weight" in keys:
        return "sd2"
    if "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys:
        return "sd1"
    widths = sorted({header[key]["shape"][-1] for key in keys if CROSS_ATTENTION_KEY.fullmatch(key)})
    if widths == [768]:
        return "sd1"  # a UNet-only checkpoint: its cross-attention width tells SD 1.x (CLIP-L, 768) ...
    if widths == [1024]:
        return "sd2"  # ... from SD 2.x (OpenCLIP-H, 1024)
    sample = ", ".join(sorted(keys)[:8])
    raise CheckpointError(
        f"{path} matches no supported family (SD 1.x, SD 2.x, SDXL base, SD3, Flux): it has no "
        "cond_stage_model.transformer.* (SD 1.x CLIP), cond_stage_model.model.* (SD 2.x OpenCLIP), "
        "conditioner.embedders.1.model.* with model.diffusion_model.label_emb.* (SDXL), joint_blocks.* (SD3) or "
        f"double_blocks.* (Flux) weights, and no UNet cross-attention of width 768 or 1024 (found {widths}). "
        f"Its first keys: {sample}")


def check_layout(header: dict, family: str, layout: Path, path: Path) -> None:
    """Refuse a layout (a diffusers folder) that disagrees with the checkpoint, naming the key and shapes."""
    expected_class = FAMILIES[family][0]
    index = _json(layout / "model_index.json", f"--config-from {layout}")
    if index.get("_class_name") != expected_class:
        raise CheckpointError(f"{path} is a {family} checkpoint (a {expected_class}) but --config-from {layout} "
                              f"is a {index.get('_class_name')}")
    disagreements = []

    def compare(key: str, position: int, component: str, field: str, value_of=lambda value: value):
        config_path = layout / component / "config.json"
        if key not in header or not config_path.is_file():
            return
        config = json.loads(config_path.read_text())
        expected = value_of(config.get(field))
        actual = header[key]["shape"][position]
        if expected is not None and actual != expected:
            disagreements.append(f"{key} has shape {header[key]['shape']} (size {actual} at {position}) but "
                                 f"{component}/config.json has {field} {config.get(field)}")

    if family in ("sd1", "sd2", "sdxl"):
        compare(CONV_IN, 0, "unet", "block_out_channels", lambda value: value[0] if value else None)
        compare(CONV_IN, 1, "unet", "in_channels")
        for key in sorted(key for key in header if CROSS_ATTENTION_KEY.fullmatch(key))[:1]:
            compare(key, 1, "unet", "cross_attention_dim")
        for key, component in {**CLIP_TOKENS, **OPEN_CLIP_TOKENS}.items():
            compare(key, 0, component, "vocab_size")
            compare(key, 1, component, "hidden_size")
        compare("first_stage_model.decoder.conv_in.weight", 1, "vae", "latent_channels")
        compare("first_stage_model.encoder.conv_in.weight", 0, "vae", "block_out_channels",
                lambda value: value[0] if value else None)
        if family == "sdxl" and SDXL_SIZE_EMBEDDING in header:
            compare(SDXL_SIZE_EMBEDDING, 1, "unet", "projection_class_embeddings_input_dim")
    if disagreements:
        raise CheckpointError(f"{path} does not fit the layout of --config-from {layout}:\n  "
                              + "\n  ".join(disagreements))


def layout_folder(config_from: Optional[str], family: str, downloads: Path, progress: Callable) -> Path:
    """The diffusers folder to convert into: ``--config-from`` (a folder, or a hub id whose configs are
    downloaded) or the family's standard repository."""
    if config_from and Path(config_from).is_dir():
        return Path(config_from)
    repository = config_from or FAMILIES[family][1]
    from huggingface_hub import snapshot_download

    target = downloads / f"layout-{repository.replace('/', '--')}"
    progress(f"downloading the configs and tokenizers of {repository} (no weights) to {target}")
    try:
        snapshot_download(repository, local_dir=target, allow_patterns=CONFIG_PATTERNS)
    except Exception as error:
        how = "--config-from names no folder here, so it was taken as a hub id" if config_from else \
            f"without --config-from, the configs of the {family} family's standard repository {repository} are used"
        raise CheckpointError(
            f"cannot fetch the layout to convert into: {how}, and that needs the Hugging Face hub at build time "
            f"({type(error).__name__}: {error}). Offline, pass --config-from DIR: a diffusers folder of the same "
            f"family (configs and tokenizers are enough; e.g. {repository} downloaded on another machine)"
        ) from None
    return target


def convert_checkpoint(path: Path, config_from: Optional[str], target: Path, downloads: Path,
                       progress: Callable) -> Path:
    """Convert ``path`` into a diffusers folder at ``target`` (replaced) and return it."""
    import shutil

    import torch
    import diffusers

    header = check_safetensors(path, "--checkpoint")
    family = detect_family(header, path)
    class_name = FAMILIES[family][0]
    progress(f"--checkpoint {path.name}: a {family} checkpoint ({len(header)} tensors) -> {class_name}")
    layout = layout_folder(config_from, family, downloads, progress)
    check_layout(header, family, layout, path)
    dtype = _dominant_dtype(header)
    progress(f"converting {path.name} into the layout of {layout} as {dtype} (diffusers from_single_file; "
             "its bar counts components)")
    started = time.monotonic()
    pipeline_class = getattr(diffusers, class_name)
    try:
        given = _sdxl_second_encoder(path, header, layout, getattr(torch, dtype)) if family == "sdxl" else {}
        pipeline = pipeline_class.from_single_file(str(path), config=str(layout), local_files_only=True,
                                                   torch_dtype=getattr(torch, dtype), **given)
    except Exception as error:
        raise CheckpointError(f"{path} does not convert into the layout of {layout}: {type(error).__name__}: "
                              f"{' '.join(str(error).split())[:800]}") from None
    progress(f"converted in {time.monotonic() - started:.1f} s; saving the diffusers folder {target}")
    shutil.rmtree(target, ignore_errors=True)
    pipeline.save_pretrained(target, safe_serialization=True)
    return target


def _sdxl_second_encoder(path: Path, header: dict, layout: Path, dtype) -> dict:
    """SDXL's OpenCLIP encoder converted from its own keys alone.

    diffusers picks the converter for ``text_encoder_2`` by comparing widths, taking the CLIP-L keys when both
    encoders have the same width (never at full size, always in the tiny model); reading only
    ``conditioner.embedders.1.*`` makes the choice explicit. Without those keys the layout's encoder is used.
    """
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors import safe_open
    from transformers import CLIPTextModelWithProjection

    prefix = "conditioner.embedders.1."
    if not any(key.startswith(prefix) for key in header):
        return {}
    with safe_open(str(path), framework="pt") as weights:
        own = {key: weights.get_tensor(key) for key in header if key.startswith(prefix)}
    encoder = create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, own, subfolder="text_encoder_2",
                                                   config=str(layout), torch_dtype=dtype, local_files_only=True)
    return {"text_encoder_2": encoder}


def _dominant_dtype(header: dict) -> str:
    """The dtype holding most of the checkpoint's bytes, so an fp16 checkpoint does not double in size."""
    totals: dict[str, int] = {}
    for entry in header.values():
        if entry["dtype"] in DTYPES:
            totals[entry["dtype"]] = totals.get(entry["dtype"], 0) + entry["data_offsets"][1] - entry["data_offsets"][0]
    return DTYPES[max(totals, key=totals.get)] if totals else "float32"


def _json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{what}: {path} is not a readable diffusers model_index.json ({error})") from None
