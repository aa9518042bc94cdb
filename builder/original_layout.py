"""Write a diffusers pipeline back as one single-file checkpoint in the original layout (CompVis LDM for SD 1.x
and 2.x, Stability's SGM for SDXL), as civitai and AUTOMATIC1111 users hold them.

Tests need such checkpoints without a hub, from the tiny pipelines, so that ``build_mar.sh --checkpoint`` is
tested on the files users have. This is the inverse of diffusers' conversion (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint`` in
``diffusers.loaders.single_file_utils``), driven by each component's config (block count, layers per block)
rather than SD 1.5's fixed block counts, so it fits any geometry. Builder-only: no worker runs it.

Original key layout, by component:
- UNet ``model.diffusion_model.``: ``input_blocks.N`` (N = 1 + block * (layers + 1) + layer; ``.0`` the resnet,
  ``.1`` the attention; the downsampler is the block's last N, ``.0.op``), ``middle_block.0/1/2`` (resnet,
  attention, resnet), ``output_blocks.N`` (N = block * (layers + 1) + layer; the upsampler ``.1.conv`` or, after
  an attention, ``.2.conv``), SDXL's size/pooled embedding ``label_emb.0``;
- VAE ``first_stage_model.``: ``encoder.down.I.block.J``, ``decoder.up.(n-1-I).block.J`` (the decoder counts up
  blocks from the bottom), ``mid.block_1/2``, ``mid.attn_1`` with 1x1-conv q/k/v/proj_out;
- CLIP in transformers' layout under ``cond_stage_model.transformer.`` (SD 1.x) or
  ``conditioner.embedders.0.transformer.`` (SDXL's first);
- OpenCLIP under ``cond_stage_model.model.`` (SD 2.x) or ``conditioner.embedders.1.model.`` (SDXL's second):
  ``transformer.resblocks.N`` with fused ``attn.in_proj_weight`` (q, k, v stacked), ``ln_final``,
  ``positional_embedding``, ``text_projection`` (transposed).
"""

from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIXES = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                         "self_attn.out_proj": "attn.out_proj"}


def unet_to_original(state: dict, config: dict) -> dict:
    """A diffusers UNet2DConditionModel state dict -> ``model.diffusion_model.*`` keys."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    per_block = config["layers_per_block"] + 1
    attention_up = ["CrossAttn" in kind for kind in config["up_block_types"]]
    original = {}
    for key, value in state.items():
        parts = key.split(".")
        if key in top:
            name = top[key]
        elif parts[0] == "down_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # down_blocks.B.downsamplers.0.conv.X
                name = f"input_blocks.{(block + 1) * per_block}.0.op.{'.'.join(parts[5:])}"
            else:
                index = 1 + block * per_block + int(parts[3])
                name = f"input_blocks.{index}.{_resnet_or_attention(kind, parts[4:])}"
        elif parts[0] == "mid_block":
            kind, layer = parts[1], int(parts[2])
            name = (f"middle_block.{2 * layer}.{_resnet(parts[3:])}" if kind == "resnets"
                    else f"middle_block.1.{'.'.join(parts[3:])}")
        elif parts[0] == "up_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":  # up_blocks.B.upsamplers.0.conv.X
                slot = 2 if attention_up[block] else 1
                name = f"output_blocks.{block * per_block + per_block - 1}.{slot}.conv.{'.'.join(parts[5:])}"
            else:
                index = block * per_block + int(parts[3])
                name = f"output_blocks.{index}.{_resnet_or_attention(kind, parts[4:])}"
        else:
            raise ValueError(f"no original-layout name for the UNet weight {key}")
        original[UNET_PREFIX + name] = value
    return original


def _resnet_or_attention(kind: str, rest: list[str]) -> str:
    return f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{'.'.join(rest)}"


def _resnet(rest: list[str]) -> str:
    return ".".join([RESNET_NAMES.get(rest[0], rest[0]), *rest[1:]])


def vae_to_original(state: dict, config: dict) -> dict:
    """A diffusers AutoencoderKL state dict -> ``first_stage_model.*`` keys (attention projections as 1x1 convs)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    blocks = len(config["up_block_types"])
    original = {}
    for key, value in state.items():
        parts = key.split(".")
        if key in top:
            name = top[key]
        elif parts[1] in ("down_blocks", "up_blocks"):  # encoder.down_blocks.I... / decoder.up_blocks.I...
            index = int(parts[2]) if parts[1] == "down_blocks" else blocks - 1 - int(parts[2])
            where = f"{parts[0]}.{'down' if parts[1] == 'down_blocks' else 'up'}.{index}"
            if parts[3] == "resnets":
                layer = parts[5].replace("conv_shortcut", "nin_shortcut")
                name = f"{where}.block.{parts[4]}.{'.'.join([layer, *parts[6:]])}"
            else:  # downsamplers.0.conv.X / upsamplers.0.conv.X
                name = f"{where}.{'downsample' if parts[3] == 'downsamplers' else 'upsample'}.conv.{parts[-1]}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            name = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        elif parts[1] == "mid_block" and parts[2] == "attentions":
            inner = ".".join(parts[4:-1])
            name = f"{parts[0]}.mid.attn_1.{VAE_ATTENTION_NAMES[inner]}.{parts[-1]}"
            if value.dim() == 2:
                value = value[:, :, None, None]
        else:
            raise ValueError(f"no original-layout name for the VAE weight {key}")
        original[VAE_PREFIX + name] = value
    return original


def clip_to_original(state: dict, prefix: str) -> dict:
    """A transformers CLIP text encoder state dict -> the checkpoint's keys (transformers' own layout)."""
    return {prefix + (key if key.startswith("text_model.") or key == "text_projection.weight"
                      else f"text_model.{key}"): value for key, value in state.items()}


def open_clip_to_original(state: dict, prefix: str) -> dict:
    """A transformers CLIP text encoder state dict -> OpenCLIP's keys, q/k/v fused into ``in_proj``."""
    import torch

    original, fused = {}, {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        parts = key.split(".")
        if key == "embeddings.token_embedding.weight":
            original[prefix + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            original[prefix + "positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            original[prefix + "ln_final." + parts[-1]] = value
        elif key == "text_projection.weight":
            original[prefix + "text_projection"] = value.T.contiguous()
        elif parts[:2] == ["encoder", "layers"]:
            layer, inner, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
            block = f"{prefix}transformer.resblocks.{layer}."
            if inner in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault(f"{block}attn.in_proj_{kind}", {})[inner[-6]] = value
            else:
                original[block + OPEN_CLIP_LAYER_NAMES[inner] + "." + kind] = value
        else:
            raise ValueError(f"no OpenCLIP name for the text encoder weight {key}")
    for name, pieces in fused.items():
        original[name] = torch.cat([pieces["q"], pieces["k"], pieces["v"]])
    return original


def write_original_checkpoint(pipeline, family: str, path: Path) -> Path:
    """Save a loaded tiny pipeline of ``family`` (sd1, sd2-v, sdxl) as one original-layout .safetensors file."""
    from safetensors.torch import save_file

    family = "sd2" if family.startswith("sd2") else family
    state = {**unet_to_original(pipeline.unet.state_dict(), pipeline.unet.config),
             **vae_to_original(pipeline.vae.state_dict(), pipeline.vae.config)}
    if family in CLIP_PREFIXES:
        state.update(clip_to_original(pipeline.text_encoder.state_dict(), CLIP_PREFIXES[family]))
    if family in OPEN_CLIP_PREFIXES:
        encoder = pipeline.text_encoder_2 if family == "sdxl" else pipeline.text_encoder
        state.update(open_clip_to_original(encoder.state_dict(), OPEN_CLIP_PREFIXES[family]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, path)
    return path
