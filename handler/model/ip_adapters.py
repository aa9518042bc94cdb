"""IP-Adapters: an image as a prompt (``ip_adapter``, ``ip_adapter_image``, ``ip_adapter_scale`` per request).

Packed by ``build_mar.sh --ip-adapter NAME=DIR`` as ``ip_adapters/NAME/ip-adapter.safetensors`` beside its
``image_encoder/``; all of a model's IP-Adapters are loaded into the UNet at start-up (they share the first one's
image encoder, which the build checks). Once loaded, the UNet expects image embeddings in every call, so each
call passes them for every adapter: the request's image embedding for the adapter it names, at its scale, and
zeros at scale 0 for the others (and for calls without an image prompt), which leaves the attention output
exactly as without the adapter. Each request's image is encoded on its own, so a batched request gets the same
image as alone; requests share a call only with the same adapter and scale (their batch key).
"""

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PACKAGED_FOLDER = "ip_adapters"
WEIGHTS = "ip-adapter.safetensors"
IMAGE_ENCODER = "image_encoder"


def ip_adapter_folders(model_dir: Path) -> dict[str, Path]:
    """The packed IP-Adapters by name."""
    root = Path(model_dir) / PACKAGED_FOLDER
    return {folder.name: folder for folder in sorted(root.iterdir()) if (folder / WEIGHTS).is_file()} \
        if root.is_dir() else {}


class IpAdapters:
    """The IP-Adapters loaded into one pipeline, and the per-call arguments that select one of them."""

    def __init__(self, pipeline, folders: dict[str, Path]):
        from diffusers.models.embeddings import ImageProjection

        self.pipeline = pipeline
        self.names = tuple(folders)
        paths = [str(folders[name]) for name in self.names]
        pipeline.load_ip_adapter(paths, subfolder=[""] * len(paths), weight_name=[WEIGHTS] * len(paths),
                                 image_encoder_folder=IMAGE_ENCODER, local_files_only=True)
        layers = pipeline.unet.encoder_hid_proj.image_projection_layers
        # The basic adapter reads the projected embedding; the "plus" kinds read the encoder's hidden states.
        self._hidden_states = [not isinstance(layer, ImageProjection) for layer in layers]
        self._blank = {}  # adapter index -> the zero embedding of one image, for calls that do not use it
        logger.info("loaded IP-Adapter(s) %s", list(self.names))

    def arguments(self, call_pipeline, prompts: list, guidance: bool) -> dict:
        """The call's ``ip_adapter_image_embeds`` (and the adapters' scales, set on the shared UNet) for
        ``prompts``, one ImagePrompt or None per image; a call's prompts share the adapter and scale.

        diffusers repeats given embeddings for every image of the call (one image prompt for the whole batch);
        here each image has its own, so the call's own pipeline object (made for this call only) is given them
        as they are, negatives first as its classifier-free guidance batches them.
        """
        chosen = next((prompt for prompt in prompts if prompt is not None), None)
        self.pipeline.set_ip_adapter_scale([chosen.scale if chosen is not None and name == chosen.name else 0.0
                                            for name in self.names])
        embeds = []
        for index, name in enumerate(self.names):
            rows = [self._encode(prompt.image, index) if prompt is not None and prompt.name == name
                    else (self._zeros(index), self._zeros(index)) for prompt in prompts]
            positive = torch.stack([row[0] for row in rows])
            negative = torch.stack([row[1] for row in rows])
            embeds.append(torch.cat([negative, positive]) if guidance else positive)
        call_pipeline.prepare_ip_adapter_image_embeds = lambda *arguments, **keywords: embeds
        return {"ip_adapter_image_embeds": embeds}

    def _encode(self, image, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's embedding and its unconditional counterpart, as diffusers' own call makes them."""
        positive, negative = self.pipeline.encode_image(image, self.pipeline._execution_device, 1,
                                                        self._hidden_states[index])
        return positive, negative

    def _zeros(self, index: int) -> torch.Tensor:
        if index not in self._blank:
            from PIL import Image

            self._blank[index] = torch.zeros_like(self._encode(Image.new("RGB", (8, 8)), index)[0])
        return self._blank[index]


def load_ip_adapters(pipeline, folders: dict[str, Path]):
    """IpAdapters for the packed folders, or None without any."""
    return IpAdapters(pipeline, folders) if folders else None
