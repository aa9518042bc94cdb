"""What the loaded model accepts, so one request contract can say "not for this family" with a reason.

Derived from the pipeline object, not from a list of model names: the size multiple from the VAE scale factor
(times the transformer's patch size for SD3 and Flux), the scheduler set from the loaded scheduler's kind,
negative prompts from whether the family uses classifier-free guidance.
"""

from dataclasses import dataclass

from handler.schedulers import DISCRETE, scheduler_kind, scheduler_names

TASKS = ("text-to-image", "image-to-image", "inpainting")
# Flux is guidance-distilled: its guidance_scale is an embedding, and it has no negative-prompt guidance
# unless true_cfg_scale is raised, which doubles the cost; the contract keeps negative prompts off for it.
NO_NEGATIVE_PROMPT_PREFIXES = ("Flux",)


@dataclass(frozen=True)
class ModelCapabilities:
    """The parts of the request contract that depend on the loaded pipeline."""

    pipeline_class: str = "StableDiffusionPipeline"
    size_multiple: int = 8
    schedulers: tuple[str, ...] = scheduler_names(DISCRETE)
    negative_prompt: bool = True
    tasks: tuple[str, ...] = TASKS


def capabilities_of(pipeline, tasks: tuple[str, ...]) -> ModelCapabilities:
    """Read the capabilities off a loaded pipeline; ``tasks`` are those the engine could set up for it."""
    class_name = type(pipeline).__name__
    scale = getattr(pipeline, "vae_scale_factor", 8)
    transformer = getattr(pipeline, "transformer", None)
    if class_name.startswith("Flux"):
        multiple = scale * 2  # Flux packs 2x2 latent patches in the pipeline (its patch_size is 1)
    elif transformer is not None:
        multiple = scale * getattr(transformer.config, "patch_size", 1)
    else:
        multiple = scale
    return ModelCapabilities(
        pipeline_class=class_name,
        size_multiple=multiple,
        schedulers=scheduler_names(scheduler_kind(pipeline.scheduler)),
        negative_prompt=not class_name.startswith(NO_NEGATIVE_PROMPT_PREFIXES),
        tasks=tasks,
    )
