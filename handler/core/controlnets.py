"""ControlNet conditions: what a request asks for, its condition maps, and the pipelines that take them.

A request names one or several of the model's packaged ControlNets and sends one condition image for each.
Its ControlNet set, scales and guidance window are part of its batch key: requests with different sets
never share a pipeline call. The ControlNet pipelines (diffusers' ``*ControlNetPipeline`` and
``*ControlNetImg2ImgPipeline``) are built with ``from_pipe`` around the shared weights, so a ControlNet adds
its own weights only.
"""

from dataclasses import dataclass, field
import numpy as np
import torch
from PIL import Image

from handler.core.capabilities import IMAGE_TO_IMAGE, TEXT_TO_IMAGE

NO_PREPROCESS, CANNY = "none", "canny"
PREPROCESSORS = (NO_PREPROCESS, CANNY)
MAX_CONDITIONING_SCALE = 2.0  # as AUTOMATIC1111's ControlNet weight slider; beyond it images saturate
CANNY_MAX_THRESHOLD = 255  # the range of AUTOMATIC1111's and ComfyUI's canny sliders
CANNY_LOW, CANNY_HIGH = 100, 200  # their defaults (OpenCV's tutorial values)

# The diffusers ControlNet pipeline of each (base pipeline, task); the tasks a family's ControlNets serve.
CONTROLNET_PIPELINES = {
    ("StableDiffusionPipeline", TEXT_TO_IMAGE): "StableDiffusionControlNetPipeline",
    ("StableDiffusionPipeline", IMAGE_TO_IMAGE): "StableDiffusionControlNetImg2ImgPipeline",
    ("StableDiffusionXLPipeline", TEXT_TO_IMAGE): "StableDiffusionXLControlNetPipeline",
    ("StableDiffusionXLPipeline", IMAGE_TO_IMAGE): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("FluxPipeline", TEXT_TO_IMAGE): "FluxControlNetPipeline",
    ("FluxPipeline", IMAGE_TO_IMAGE): "FluxControlNetImg2ImgPipeline",
}
# The ControlNet model class each base pipeline takes (build_mar.sh checks a packed folder against it).
CONTROLNET_MODELS = {"StableDiffusionPipeline": "ControlNetModel", "StableDiffusionXLPipeline": "ControlNetModel",
                     "FluxPipeline": "FluxControlNetModel"}


@dataclass(frozen=True)
class ControlCondition:
    """One request's ControlNets (by name), a condition image for each, their scales and guidance window."""

    names: tuple[str, ...]
    images: tuple[Image.Image, ...] = field(compare=False)
    scales: tuple[float, ...]
    guidance_start: float
    guidance_end: float

    def batch_key(self) -> tuple:
        """Scales and the window are per call in diffusers: only equal ones share a call."""
        return self.names, self.scales, self.guidance_start, self.guidance_end

    def parameters(self) -> dict:
        return {"controlnet": list(self.names), "controlnet_conditioning_scale": list(self.scales),
                "control_guidance_start": self.guidance_start, "control_guidance_end": self.guidance_end}


def controlnet_tasks(pipeline_class: str, tasks: tuple[str, ...]) -> tuple[str, ...]:
    """Those of ``tasks`` that the base pipeline's ControlNets can run."""
    return tuple(task for task in tasks if (pipeline_class, task) in CONTROLNET_PIPELINES)


def canny_edges(image: Image.Image, low: int, high: int) -> Image.Image:
    """The Canny edge map of ``image`` (white edges on black, RGB), the condition a canny ControlNet expects."""
    import cv2

    grey = np.asarray(image.convert("L"))
    edges = cv2.Canny(grey, low, high)
    return Image.fromarray(edges).convert("RGB")


def controlnet_pipeline(pipeline, task: str, models: list):
    """The diffusers ControlNet pipeline for ``task`` around ``pipeline``'s weights, with ``models`` (several
    are combined by the pipeline into its multi-ControlNet model)."""
    import diffusers

    pipeline_class = getattr(diffusers, CONTROLNET_PIPELINES[(type(pipeline).__name__, task)])
    return pipeline_class.from_pipe(pipeline, controlnet=models[0] if len(models) == 1 else list(models))


def control_arguments(pipeline_class: type, conditions: list[ControlCondition]) -> dict:
    """The ControlNet arguments of one call, ``conditions`` holding each image's condition (equal batch keys).

    Text-to-image UNet pipelines take the condition as ``image``; the others as ``control_image``. With several
    ControlNets each gets its own batch: SDXL's pipelines refuse nested lists, so UNet pipelines get tensors
    (what diffusers makes of the images itself); Flux normalises tensors differently and gets lists.
    """
    import inspect

    first = conditions[0]
    parameters = inspect.signature(pipeline_class.__call__).parameters
    name = "control_image" if "control_image" in parameters else "image"
    if len(first.names) == 1:
        images = [condition.images[0] for condition in conditions]
    elif pipeline_class.__name__.startswith("Flux"):
        images = [[condition.images[k] for condition in conditions] for k in range(len(first.names))]
    else:
        images = [_as_tensor([condition.images[k] for condition in conditions]) for k in range(len(first.names))]
    scales = first.scales[0] if len(first.scales) == 1 else list(first.scales)
    return {name: images, "controlnet_conditioning_scale": scales,
            "control_guidance_start": first.guidance_start, "control_guidance_end": first.guidance_end}


def _as_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images as one N x 3 x H x W float batch in [0, 1]."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2)
