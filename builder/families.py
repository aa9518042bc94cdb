"""The model families build_mar.sh --tiny can build, and what each one's real checkpoints expect.

Kept apart from tiny_pipeline.py (which imports torch and diffusers) so that build_mar.sh's argument parsing
stays instant; the tests check that the serving code reads the same facts off each loaded pipeline.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyInfo:
    """What serving code needs to know about a family, measured on the diffusers version in use.

    ``negative_prompt``: ``guidance_scale`` drives classifier-free guidance, so a negative prompt takes effect.
    Flux is guidance-distilled: its ``guidance_scale`` is an input embedding and its ``negative_prompt`` only
    acts with ``true_cfg_scale > 1`` (which doubles the cost), so it is False there.
    """

    pipeline_class: str
    size_multiple: int
    default_size: int
    negative_prompt: bool
    scheduler_kind: str


# Size multiple: the VAE halves the side 3 times (8); SD3's transformer then patchifies 2x2 latents and Flux's
# pipeline packs 2x2 latents into channels (16). SD/SDXL/SD3 refuse other sizes, Flux silently rounds down.
FAMILY_INFO = {
    "sd1": FamilyInfo("StableDiffusionPipeline", 8, 768, True, "discrete"),
    "sd1-safety": FamilyInfo("StableDiffusionPipeline", 8, 768, True, "discrete"),
    "sd2-v": FamilyInfo("StableDiffusionPipeline", 8, 768, True, "discrete"),
    "sdxl": FamilyInfo("StableDiffusionXLPipeline", 8, 1024, True, "discrete"),
    "sd3": FamilyInfo("StableDiffusion3Pipeline", 16, 1024, True, "flow_matching"),
    "flux": FamilyInfo("FluxPipeline", 16, 1024, False, "flow_matching"),
}
FAMILIES = tuple(FAMILY_INFO)
# Families build_mar.sh --tiny --full-size builds with their published configs (builder/full_size.py).
FULL_SIZE_FAMILIES = ("sd1", "sd2-v", "sdxl", "sd3")
