"""Tiny random LoRA adapters for the tiny pipelines, made offline with PEFT, in the two formats people ship.

Tests and the docs' examples need LoRA files without a hub. A LoRA here is what a trainer would save: PEFT LoRA
layers on the denoiser's attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), written by the
pipeline's own ``save_lora_weights`` (the diffusers/PEFT format), or the same weights renamed to the
kohya/sd-scripts format that civitai files use (``lora_unet_<module path with _>.lora_down/lora_up/alpha``),
which diffusers' ``load_lora_weights`` converts on load. Random non-zero weights (PEFT initialises LoRA B to
zero, which would make an adapter that changes nothing) so that an adapter visibly changes the image.
"""

from pathlib import Path

import torch

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
FORMATS = ("diffusers", "kohya")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name save_lora_weights writes
KOHYA_FAMILIES = ("sd1", "sd1-safety", "sd2-v", "sdxl")  # UNet families: kohya names follow the module paths


def make_tiny_lora(pipeline_folder: Path, target: Path, seed: int = 0, rank: int = 4, lora_format: str = "diffusers",
                   weight: float = 0.3) -> Path:
    """Write a LoRA for the pipeline in ``pipeline_folder`` to the file ``target``; returns ``target``.

    ``weight``: the spread of the random LoRA weights (larger changes the image more).
    """
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    from handler.model.pipeline_index import null_components

    if lora_format not in FORMATS:
        raise ValueError(f"unknown LoRA format {lora_format!r}; expected one of {FORMATS}")
    pipeline = DiffusionPipeline.from_pretrained(pipeline_folder, local_files_only=True,
                                                 **null_components(pipeline_folder))
    denoiser_name = "unet" if getattr(pipeline, "unet", None) is not None else "transformer"
    denoiser = getattr(pipeline, denoiser_name)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGET_MODULES, init_lora_weights=False))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in denoiser.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * weight)
    layers = get_peft_model_state_dict(denoiser)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if lora_format == "kohya":
        if denoiser_name != "unet":
            raise ValueError("kohya-format tiny LoRAs are made for UNet families only (sd1, sd2, sdxl)")
        save_file(to_kohya(layers, rank), target)
    else:
        saved = target.parent / f".{target.name}.folder"
        type(pipeline).save_lora_weights(saved, **{f"{denoiser_name}_lora_layers": layers})
        (saved / LORA_FILE).replace(target)
        saved.rmdir()
    target.chmod(0o644)
    return target


def to_kohya(layers: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """PEFT UNet LoRA weights (``down_blocks.1....to_q.lora_A.weight``) renamed as kohya/sd-scripts writes them
    (``lora_unet_down_blocks_1_..._to_q.lora_down.weight``, plus ``.alpha``, here equal to the rank: scale 1)."""
    converted = {}
    for key, tensor in layers.items():
        module, kind = key.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        converted[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = tensor.contiguous()
        converted[f"{name}.alpha"] = torch.tensor(float(rank))
    return converted


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m builder.tiny_adapters",
                                     description="Write a tiny random LoRA for a tiny pipeline (tests and demos).")
    parser.add_argument("pipeline", type=Path, help="the pipeline folder (e.g. build/tiny-sd1 after build_mar.sh --tiny)")
    parser.add_argument("output", type=Path, help="the .safetensors file to write")
    parser.add_argument("--format", choices=FORMATS, default="diffusers", dest="lora_format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=4)
    arguments = parser.parse_args(argv)
    path = make_tiny_lora(arguments.pipeline, arguments.output, arguments.seed, arguments.rank, arguments.lora_format)
    print(f"wrote {path} ({arguments.lora_format} format, rank {arguments.rank})")


if __name__ == "__main__":
    main()
