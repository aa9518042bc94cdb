"""Build random-weight pipelines with the exact published configs of real checkpoints, offline.

Random weights cost exactly what trained ones cost in time, memory and bytes (only the pictures are noise), so
a full-size SD 1.5, SD 2.1 (v-prediction), SDXL base or SD3 medium built here measures the archive, the cold
start, the memory and the speed a user of the real model gets, without a model hub. The component configs below
are the published ``config.json`` files of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
stabilityai/stable-diffusion-xl-base-1.0 and stabilityai/stable-diffusion-3-medium-diffusers (December 2026);
``PUBLISHED_PARAMETERS`` are their parameter counts, which the tests check the configs against without building
any weights. SD3 medium is built without its T5-XXL encoder (4.7 B parameters, 9.5 GB in fp16: more than this
project's 2-core, 24 GB machines hold beside the rest), as diffusers loads it with ``text_encoder_3=None``.

Weights are created directly in float16 (as the hub's fp16 files are) so building SDXL never holds a float32
copy. The tokenizers carry CLIP's real BPE vocabulary (49,408 tokens, 48,894 merges), read from the
``bpe_simple_vocab_16e6.txt.gz`` that the open_clip_torch wheel ships (see ``clip_bpe_file``).
"""

import gzip
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, Optional

from builder.families import FULL_SIZE_FAMILIES

OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"  # read as a zip only: installing it would pull torchvision in
CLIP_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2  # the merges CLIP's tokenizer uses (the file lists more)
START, END = "<|startoftext|>", "<|endoftext|>"

_SD_UNET = {
    "act_fn": "silu", "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "in_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
}
_SCALED_LINEAR = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "steps_offset": 1, "trained_betas": None}
_CLIP_L_TEXT = {  # openai/clip-vit-large-patch14's text tower: SD 1.x's encoder, SDXL's and SD3's first
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "hidden_act": "quick_gelu", "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77,
    "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
_CLIP_G_TEXT = {  # OpenCLIP ViT-bigG/14's text tower: SDXL's and SD3's second encoder
    "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
    "hidden_act": "gelu", "projection_dim": 1280, "vocab_size": 49408, "max_position_embeddings": 77,
    "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}

# family -> component -> (class name, published config); the tokenizers' value is their pad token.
PUBLISHED_CONFIGS = {
    "sd1": {
        "unet": ("UNet2DConditionModel", {**_SD_UNET, "attention_head_dim": 8, "cross_attention_dim": 768,
                                          "sample_size": 64}),
        "vae": ("AutoencoderKL", {**_VAE, "sample_size": 512}),
        "text_encoder": ("CLIPTextModel", _CLIP_L_TEXT),
        "tokenizer": ("CLIPTokenizer", END),
        "scheduler": ("PNDMScheduler", {**_SCALED_LINEAR, "set_alpha_to_one": False, "skip_prk_steps": True,
                                        "clip_sample": False}),
    },
    "sd2-v": {
        "unet": ("UNet2DConditionModel", {**_SD_UNET, "attention_head_dim": [5, 10, 20, 20],
                                          "cross_attention_dim": 1024, "dual_cross_attention": False,
                                          "sample_size": 96, "upcast_attention": True,
                                          "use_linear_projection": True}),
        "vae": ("AutoencoderKL", {**_VAE, "sample_size": 768}),
        "text_encoder": ("CLIPTextModel", {  # OpenCLIP ViT-H/14's text tower, its last layer dropped
            "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
            "hidden_act": "gelu", "projection_dim": 512, "vocab_size": 49408, "max_position_embeddings": 77,
            "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}),
        "tokenizer": ("CLIPTokenizer", "!"),
        "scheduler": ("DDIMScheduler", {**_SCALED_LINEAR, "clip_sample": False, "set_alpha_to_one": False,
                                        "prediction_type": "v_prediction"}),
    },
    "sdxl": {
        "unet": ("UNet2DConditionModel", {
            "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
            "center_input_sample": False, "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
            "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
            "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
            "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "upcast_attention": False, "use_linear_projection": True}),
        "vae": ("AutoencoderKL", {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}),
        "text_encoder": ("CLIPTextModel", _CLIP_L_TEXT),
        "text_encoder_2": ("CLIPTextModelWithProjection", _CLIP_G_TEXT),
        "tokenizer": ("CLIPTokenizer", END),
        "tokenizer_2": ("CLIPTokenizer", "!"),
        "scheduler": ("EulerDiscreteScheduler", {**_SCALED_LINEAR, "interpolation_type": "linear",
                                                 "prediction_type": "epsilon", "sample_max_value": 1.0,
                                                 "timestep_spacing": "leading", "use_karras_sigmas": False}),
    },
    "sd3": {  # without text_encoder_3 / tokenizer_3 (T5-XXL): see the module's docstring
        "transformer": ("SD3Transformer2DModel", {
            "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
            "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2,
            "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "sample_size": 128}),
        "vae": ("AutoencoderKL", {**_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305,
                                  "shift_factor": 0.0609, "force_upcast": True, "use_quant_conv": False,
                                  "use_post_quant_conv": False}),
        "text_encoder": ("CLIPTextModelWithProjection", _CLIP_L_TEXT),
        "text_encoder_2": ("CLIPTextModelWithProjection", _CLIP_G_TEXT),
        "tokenizer": ("CLIPTokenizer", END),
        "tokenizer_2": ("CLIPTokenizer", "!"),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),
    },
}
PIPELINE_CLASSES = {"sd1": "StableDiffusionPipeline", "sd2-v": "StableDiffusionPipeline",
                    "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline"}
# Parameter counts of the published checkpoints' components.
PUBLISHED_PARAMETERS = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2-v": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
             "text_encoder_2": 694_659_840},
    "sd3": {"transformer": 2_028_328_000, "vae": 83_819_683, "text_encoder": 123_650_304,
            "text_encoder_2": 694_659_840},
}


def make_model(class_name: str, config: dict):
    """One model component from its published config, with random weights in the current default dtype."""
    import diffusers
    import transformers

    if hasattr(diffusers, class_name):
        return getattr(diffusers, class_name).from_config(config)
    model_class = getattr(transformers, class_name)
    return model_class(model_class.config_class(**config))


def is_tokenizer(class_name: str) -> bool:
    return class_name.endswith("Tokenizer")


def is_scheduler(class_name: str) -> bool:
    return class_name.endswith("Scheduler")


def clip_bpe_file(work_dir: Path, progress: Callable[[str], None]) -> bytes:
    """The gzipped CLIP BPE merges: from an installed open_clip package, else from the open_clip_torch wheel
    (downloaded once into ``work_dir`` with ``pip download --no-deps``; it is read as a zip, never installed,
    because its requirements would replace this environment's pinned torch build with one needing torchvision)."""
    spec = importlib.util.find_spec("open_clip")  # finding a package does not import it
    if spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]) / CLIP_BPE_NAME
        if installed.is_file():
            return installed.read_bytes()
    wheels = work_dir / "wheels"
    name, version = OPEN_CLIP_WHEEL.split("==")
    found = sorted(wheels.glob(f"{name}-{version}-*.whl"))
    if not found:
        progress(f"downloading the {OPEN_CLIP_WHEEL} wheel (1.5 MB) for CLIP's BPE vocabulary")
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                 "-d", str(wheels), OPEN_CLIP_WHEEL], capture_output=True, text=True)
        found = sorted(wheels.glob(f"{name}-{version}-*.whl"))
        if result.returncode != 0 or not found:
            raise SystemExit(f"build_mar: could not download {OPEN_CLIP_WHEEL} for CLIP's vocabulary "
                             f"({result.stderr.strip()[-300:]}); put its wheel in {wheels} and build again")
    with zipfile.ZipFile(found[0]) as wheel:
        return wheel.read(f"open_clip/{CLIP_BPE_NAME}")


def clip_vocabulary(bpe_gz: bytes) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of CLIP's tokenizer from its BPE file, in the order openai/clip-vit-large-patch14's
    vocab.json has: 256 byte symbols, the same with ``</w>``, one token per merge, then the two special tokens."""
    from builder.tiny_pipeline import _byte_alphabet

    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = [line for line in lines[1:] if line][:CLIP_MERGES]  # line 0 is the file's header
    alphabet = _byte_alphabet()
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    tokens += ["".join(merge.split()) for merge in merges] + [START, END]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path, vocabulary: tuple[dict[str, int], list[str]], pad_token: str) -> None:
    """A CLIPTokenizer folder as the hub's SD checkpoints hold it (vocab.json, merges.txt, configs)."""
    vocab, merges = vocabulary
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokens = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(tokens))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **tokens}))


def build_full_size_pipeline(folder: Path, family: str, work_dir: Path,
                             progress: Callable[[str], None] = print, seed: int = 0) -> Path:
    """Write a random-weight ``family`` pipeline with its published configs to ``folder``, fp16 safetensors.

    One component is built and saved at a time, so the peak memory is the largest component (SDXL's UNet,
    5.1 GB), not the whole pipeline."""
    import diffusers
    import torch
    from transformers import CLIPTokenizer

    if family not in PUBLISHED_CONFIGS:
        raise ValueError(f"no published config for family {family!r}; full size exists for {FULL_SIZE_FAMILIES}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = clip_vocabulary(clip_bpe_file(work_dir, progress))
    index = {"_class_name": PIPELINE_CLASSES[family], "_diffusers_version": diffusers.__version__}
    for name, (class_name, config) in PUBLISHED_CONFIGS[family].items():
        progress(f"  {name}: {class_name}")
        if is_tokenizer(class_name):
            write_clip_tokenizer(folder / name, vocabulary, pad_token=config)
            CLIPTokenizer.from_pretrained(folder / name)  # fail here, not in a worker, if it does not load
            index[name] = ["transformers", class_name]
            continue
        if is_scheduler(class_name):
            getattr(diffusers, class_name).from_config(config).save_pretrained(folder / name)
            index[name] = ["diffusers", class_name]
            continue
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float16)  # initialise in half: SDXL's UNet never exists in float32
        try:
            model = make_model(class_name, config)
        finally:
            torch.set_default_dtype(previous)
        model.save_pretrained(folder / name, safe_serialization=True)
        index[name] = ["diffusers" if hasattr(diffusers, class_name) else "transformers", class_name]
        del model
    index.update(feature_extractor=[None, None], image_encoder=[None, None])  # as save_pretrained writes them
    if family == "sdxl":
        index["force_zeros_for_empty_prompt"] = True
    elif family == "sd3":
        index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    else:  # no safety checker, as the tiny pipelines (the published SD 1.5/2.1 ship one: 304 M more)
        index.update(safety_checker=[None, None], requires_safety_checker=False)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return folder


def count_parameters(family: str) -> dict[str, int]:
    """Parameters of each model component built from the published configs on the meta device (no memory)."""
    import torch

    counts = {}
    for name, (class_name, config) in PUBLISHED_CONFIGS[family].items():
        if is_tokenizer(class_name) or is_scheduler(class_name):
            continue
        with torch.device("meta"):
            model = make_model(class_name, config)
        counts[name] = sum(parameter.numel() for parameter in model.parameters())
    return counts


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=FULL_SIZE_FAMILIES)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--work-dir", type=Path, default=Path("build"))
    arguments = parser.parse_args(argv)
    build_full_size_pipeline(arguments.folder, arguments.family, arguments.work_dir)


if __name__ == "__main__":
    main()
