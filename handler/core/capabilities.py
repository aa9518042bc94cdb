"""What the loaded model accepts, so one request contract can say "not for this family" with a reason.

Derived from the pipeline object, not from a list of model names: the size multiple from the VAE scale factor
(times the transformer's patch size for SD3 and Flux), the scheduler set from the loaded scheduler's kind,
negative prompts from whether the family uses classifier-free guidance.
"""

from dataclasses import dataclass

from typing import Optional

from handler.core.schedulers import DISCRETE, scheduler_kind, scheduler_name_of, scheduler_names

TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINTING = "text-to-image", "image-to-image", "inpainting"
TASKS = (TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINTING)
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
    default_scheduler: str = "pndm"  # what a request that names no scheduler gets
    family: Optional[str] = None  # the folder's model family, where known (sd1, sdxl, sd3, flux, ...)
    loras: tuple[str, ...] = ()  # the LoRA adapters a request may name (handler/model/adapters.py)
    controlnets: tuple[str, ...] = ()  # the packaged ControlNets, by name (handler/model/controlnets.py)
    controlnet_tasks: tuple[str, ...] = ()  # the tasks they work with
    embeddings: tuple[str, ...] = ()
    ip_adapters: tuple[str, ...] = ()  # the packed IP-Adapters, by name (handler/model/ip_adapters.py)  # textual-inversion words a prompt may use (handler/model/embeddings.py)

    def describe(self, default_width: int, default_height: int) -> dict:
        """The capabilities as the describe API shows them."""
        return {"family": self.family, "pipeline_class": self.pipeline_class, "tasks": list(self.tasks),
                "schedulers": list(self.schedulers), "default_scheduler": self.default_scheduler,
                "size_multiple": self.size_multiple, "negative_prompt": self.negative_prompt,
                "default_width": default_width, "default_height": default_height, "loras": list(self.loras),
                "controlnets": list(self.controlnets), "controlnet_tasks": list(self.controlnet_tasks),
                "embeddings": list(self.embeddings), "ip_adapters": list(self.ip_adapters)}


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
        default_scheduler=scheduler_name_of(pipeline.scheduler),
        family=family_of(class_name),
    )


FAMILY_OF_CLASS = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                   "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def family_of(class_name: str) -> Optional[str]:
    """The family a pipeline class belongs to (sd covers SD 1.x and 2.x), or None for other pipelines."""
    return FAMILY_OF_CLASS.get(class_name)
