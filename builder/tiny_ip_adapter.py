"""A tiny random IP-Adapter for a tiny pipeline, in the layout ``build_mar.sh --ip-adapter`` takes: one
``ip-adapter.safetensors`` beside an ``image_encoder/`` folder (as h94/IP-Adapter ships them).

The weights follow the original IP-Adapter format that diffusers' ``load_ip_adapter`` converts: ``image_proj``
(a linear map of the image encoder's projected embedding to 4 tokens as wide as the UNet's cross-attention,
then a layer norm) and, for every cross-attention layer of the UNet in order, ``ip_adapter.K.to_k_ip`` and
``to_v_ip`` (K = 1, 3, 5, ...: the original counts self- and cross-attention layers alike). The image encoder is
a 2-layer CLIP vision model on 32-pixel images. Builder-only: tests and docs use it offline.
"""

import json
from pathlib import Path

import torch

TOKENS = 4  # image tokens of the basic IP-Adapter
IMAGE_EMBEDDING = 32  # the tiny image encoder's projection width
WEIGHTS = "ip-adapter.safetensors"


def build_tiny_ip_adapter(pipeline_folder: Path, target: Path, seed: int = 0) -> Path:
    """Write a random IP-Adapter that fits the UNet of ``pipeline_folder`` into ``target``; returns target."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = json.loads((Path(pipeline_folder) / "unet" / "config.json").read_text())
    cross, widths = unet["cross_attention_dim"], unet["block_out_channels"]
    generator = torch.Generator().manual_seed(seed)

    def random(*shape):
        return torch.randn(*shape, generator=generator) * 0.5

    state = {"image_proj.proj.weight": random(cross * TOKENS, IMAGE_EMBEDDING),
             "image_proj.proj.bias": random(cross * TOKENS),
             "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    for number, hidden in enumerate(_cross_attention_widths(unet, widths)):
        for projection in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * number + 1}.{projection}.weight"] = random(hidden, cross)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    save_file(state, target / WEIGHTS)
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
        patch_size=4, projection_dim=IMAGE_EMBEDDING))
    encoder.save_pretrained(target / "image_encoder")
    return target


def _cross_attention_widths(unet: dict, widths: list[int]) -> list[int]:
    """The hidden width of each cross-attention layer, in the order of the UNet's attention processors (down
    blocks, up blocks, then the mid block: diffusers' attn_processors order)."""
    layers = unet["layers_per_block"]
    depth = unet.get("transformer_layers_per_block", 1)
    down = [widths[index] for index, kind in enumerate(unet["down_block_types"]) if "CrossAttn" in kind
            for _ in range(layers * (depth if isinstance(depth, int) else depth[index]))]
    up_widths = list(reversed(widths))
    up = [up_widths[index] for index, kind in enumerate(unet["up_block_types"]) if "CrossAttn" in kind
          for _ in range((layers + 1) * (depth if isinstance(depth, int) else list(reversed(depth))[index]))]
    return down + up + [widths[-1]] * (depth if isinstance(depth, int) else depth[-1])
