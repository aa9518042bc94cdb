"""Build tiny random-weight diffusers pipelines offline, one per supported model family.

Tests, the demo, the docs' examples and the benchmarks need pipelines without a model hub. These keep the real geometry of
each family (a 4-block VAE, so latents are 1/8 of the image side; 77-token CLIP tokenizers; the real default
image size; the real scheduler kind and prediction type) while being a few MB and building in about a second.
They are saved with ``save_pretrained`` exactly as a downloaded checkpoint, so they go through the same loading
and archiving code as a real model, including components saved as ``[null, null]`` in ``model_index.json``.
"""

import json
from pathlib import Path

import torch

from builder.families import FAMILIES

TOKENIZER_MAX_LENGTH = 77
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")




def _byte_alphabet() -> list[str]:
    """The printable stand-ins for the 256 byte values that CLIP's byte-level BPE uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def write_tokenizer(folder: Path) -> int:
    """Write a byte-level BPE vocabulary without merges: every byte is a token. Returns the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = list(SPECIAL_TOKENS) + alphabet + [symbol + "</w>" for symbol in alphabet]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1],
                    "pad_token": SPECIAL_TOKENS[1], "unk_token": SPECIAL_TOKENS[1]})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": TOKENIZER_MAX_LENGTH,
                    "bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1],
                    "pad_token": SPECIAL_TOKENS[1], "unk_token": SPECIAL_TOKENS[1]})
    )
    return len(tokens)


def _clip_tokenizer(folder: Path):
    """A CLIP tokenizer written to ``folder``; ``model_max_length`` is passed or the pipeline pads to 1e30."""
    from transformers import CLIPTokenizer

    write_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=TOKENIZER_MAX_LENGTH)


def _clip_text_encoder(vocab_size: int, seed: int, projection_dim: int | None = None, hidden_act="quick_gelu"):
    """A 5-layer CLIP text encoder; with ``projection_dim`` the variant with a pooled projection (SDXL, SD3)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = dict(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=vocab_size,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        hidden_act=hidden_act,
    )
    torch.manual_seed(seed)
    if projection_dim is None:
        return CLIPTextModel(CLIPTextConfig(**config))
    return CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=projection_dim, **config))


def _vae(seed: int, sample_size: int, latent_channels: int = 4, **config):
    """A 4-block VAE, so the latent side is 1/8 of the image side as in every real family."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=sample_size,
        **config,
    )


def _flow_vae(seed: int, shift_factor: float, scaling_factor: float):
    """The 16-channel VAE of SD3 and Flux: no quant convs, latents shifted and scaled before the transformer."""
    return _vae(seed, 1024, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=shift_factor, scaling_factor=scaling_factor)


def _stable_diffusion(folder: Path, seed: int, scheduler, hidden_act="quick_gelu", **unet_config):
    """An SD 1.x/2.x pipeline with a 2-block UNet whose sample size 96 makes the default image 768 px."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = _clip_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=96,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        **unet_config,
    )
    return StableDiffusionPipeline(
        vae=_vae(seed, 768),
        text_encoder=_clip_text_encoder(len(tokenizer), seed, hidden_act=hidden_act),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sd1(folder: Path, seed: int):
    """SD 1.5 layout: PNDM scheduler with epsilon prediction, no safety checker."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return _stable_diffusion(folder, seed, scheduler)


def _build_sd1_safety(folder: Path, seed: int):
    """SD 1.5 with a safety checker whose thresholds flag every image, so the NSFW path is always taken.

    A concept scores ``cosine(image, concept) - weight``, flagged when above 0; cosines lie in [-1, 1], so a
    weight of -2 flags every image whatever the random embeddings are.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipeline = _build_sd1(folder, seed)
    torch.manual_seed(seed)
    safety_checker = StableDiffusionSafetyChecker(
        CLIPConfig(
            text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                         "num_hidden_layers": 1, "projection_dim": 32},
            vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                           "num_hidden_layers": 2, "image_size": 32, "patch_size": 4, "projection_dim": 32},
            projection_dim=32,
        )
    )
    with torch.no_grad():
        safety_checker.concept_embeds_weights.fill_(-2.0)
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return StableDiffusionPipeline(
        **{**pipeline.components, "safety_checker": safety_checker, "feature_extractor": feature_extractor},
        requires_safety_checker=True,
    )


def _build_sd2_v(folder: Path, seed: int):
    """SD 2.1 layout: v-prediction DDIM scheduler, linear-projection attention with per-block head dims."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    return _stable_diffusion(folder, seed, scheduler, hidden_act="gelu", attention_head_dim=(2, 4),
                             use_linear_projection=True)


def _build_sdxl(folder: Path, seed: int):
    """SDXL layout: two CLIP encoders whose hidden states are concatenated (32 + 32 = cross-attention 64), the
    second one's pooled projection plus six size/crop ids feeding the UNet's "text_time" embedding."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = _clip_tokenizer(folder / "tokenizer")
    tokenizer_2 = _clip_tokenizer(folder / "tokenizer_2")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=_vae(seed, 1024, scaling_factor=0.13025),
        text_encoder=_clip_text_encoder(len(tokenizer), seed),
        text_encoder_2=_clip_text_encoder(len(tokenizer_2), seed + 1, projection_dim=32, hidden_act="gelu"),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


def _build_sd3(folder: Path, seed: int):
    """SD3 without T5 (text_encoder_3 and tokenizer_3 saved as null): the two CLIPs' hidden states (32 + 32)
    fill the 64-wide joint attention input and their pooled projections (32 + 32) the pooled input."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = _clip_tokenizer(folder / "tokenizer")
    tokenizer_2 = _clip_tokenizer(folder / "tokenizer_2")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        pos_embed_max_size=192,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(seed, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip_text_encoder(len(tokenizer), seed, projection_dim=32),
        text_encoder_2=_clip_text_encoder(len(tokenizer_2), seed + 1, projection_dim=32, hidden_act="gelu"),
        text_encoder_3=None,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        tokenizer_3=None,
    )


def _t5_tokenizer():
    """A Unigram T5 tokenizer whose pieces are single ASCII characters; it saves as tokenizer.json, so loading it
    needs neither sentencepiece nor a download."""
    from transformers import T5TokenizerFast

    characters = [chr(code) for code in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(character, -3.0) for character in characters]
    vocab += [("▁" + character, -3.0) for character in characters]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def _build_flux(folder: Path, seed: int):
    """FLUX.1-dev layout: CLIP pooled output (32) and T5 hidden states (32) condition a transformer that sees
    16-channel latents packed 2x2 (64 channels); guidance is an embedding, the scheduler shifts by image size."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = _clip_tokenizer(folder / "tokenizer")
    tokenizer_2 = _t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_flow_vae(seed, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=_clip_text_encoder(len(tokenizer), seed),
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
    )


_BUILDERS = {
    "sd1": _build_sd1,
    "sd1-safety": _build_sd1_safety,
    "sd2-v": _build_sd2_v,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "flux": _build_flux,
}


def build_tiny_pipeline(folder: Path, family: str = "sd1", seed: int = 0):
    """Create the tiny pipeline of ``family`` (one of ``FAMILIES``), save it to ``folder`` and return it."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    folder = Path(folder)
    pipeline = _BUILDERS[family](folder, seed)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return pipeline
