"""Tiny random-weight ControlNets for the tiny pipelines, built offline as diffusers folders.

A ControlNet made with ``ControlNetModel.from_unet`` (``FluxControlNetModel.from_transformer``) starts with
its output convolutions at zero, so it adds nothing and an image made with it equals one made without. These
makers fill the weights of those layers with random values, seeded, and leave their biases at zero, so what a
tiny ControlNet adds depends on its condition image, and two seeds of it steer differently.
Run as ``python -m builder.tiny_controlnets --family sdxl build/cn-sdxl`` to get one for the docs' examples.
"""

import argparse
from pathlib import Path

import torch

from builder.families import FAMILIES

# Conv channels of the condition image's encoder: four stages halve the side three times, to the latent side.
CONDITIONING_CHANNELS = (8, 8, 16, 16)
ZERO_INITIALISED = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_blocks", "controlnet_single_blocks")
RANDOM_STD = 0.1  # the residuals' convs: larger ones saturate the tiny UNet, so every image looks alike
# The condition image's encoder. With its default initialisation and biases its output hardly depends on the
# image (two opposite half-white images differ by 0.3 %): it is re-initialised and calibrated.
CONDITION_ENCODER = ("controlnet_cond_embedding", "controlnet_x_embedder")


def build_tiny_controlnet(pipeline_folder: Path, target: Path, seed: int = 1):
    """Write a random ControlNet that fits the pipeline in ``pipeline_folder`` (its UNet or transformer) to
    ``target`` and return it."""
    from diffusers import ControlNetModel, FluxControlNetModel, FluxTransformer2DModel, UNet2DConditionModel

    pipeline_folder = Path(pipeline_folder)
    torch.manual_seed(seed)
    if (pipeline_folder / "unet").is_dir():
        unet = UNet2DConditionModel.from_pretrained(pipeline_folder / "unet")
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    elif (pipeline_folder / "transformer").is_dir():
        transformer = FluxTransformer2DModel.from_pretrained(pipeline_folder / "transformer")
        config = transformer.config
        controlnet = FluxControlNetModel.from_transformer(
            transformer, num_layers=1, num_single_layers=1, attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads)
    else:
        raise ValueError(f"{pipeline_folder} has neither a unet/ nor a transformer/ folder")
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.startswith(CONDITION_ENCODER):  # He-initialised without biases: the image's shapes pass on
                if name.endswith("weight"):
                    torch.nn.init.kaiming_normal_(parameter)
                else:
                    parameter.zero_()
            elif name.startswith(ZERO_INITIALISED) and name.endswith("weight"):
                parameter.normal_(0.0, RANDOM_STD)
        if isinstance(controlnet, ControlNetModel):
            _calibrate_condition_encoder(controlnet)
    controlnet.save_pretrained(Path(target), safe_serialization=True)
    return controlnet


def _calibrate_condition_encoder(controlnet) -> None:
    """Scale the encoder's last conv so its output is about as large as the latent features it is added to
    (mean magnitude 1 for a half-white image); eight small random convs otherwise shrink it a hundredfold."""
    probe = torch.zeros(1, 3, 64, 64)
    probe[..., :32] = 1.0
    encoder = controlnet.controlnet_cond_embedding
    encoder.conv_out.weight.mul_(1.0 / encoder(probe).abs().mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random ControlNet for a tiny pipeline family")
    parser.add_argument("--family", choices=FAMILIES, default="sd1", help="the family it fits (default: sd1)")
    parser.add_argument("--seed", type=int, default=1, help="seed of its random weights (default: 1)")
    parser.add_argument("--work-dir", type=Path, default=Path("build"),
                        help="where the family's tiny pipeline is built (default: build)")
    parser.add_argument("target", type=Path, help="the folder to write")
    arguments = parser.parse_args(argv)
    from builder.tiny_pipeline import build_tiny_pipeline

    pipeline_folder = arguments.work_dir / f"tiny-{arguments.family}"
    if not (pipeline_folder / "model_index.json").is_file():
        print(f"building the tiny {arguments.family} pipeline in {pipeline_folder}", flush=True)
        build_tiny_pipeline(pipeline_folder, arguments.family)
    build_tiny_controlnet(pipeline_folder, arguments.target, arguments.seed)
    print(f"wrote a tiny {arguments.family} ControlNet to {arguments.target}", flush=True)


if __name__ == "__main__":
    main()
