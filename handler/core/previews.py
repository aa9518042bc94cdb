"""Cheap previews of a generation in progress: a linear map from the latents to RGB, fitted to the model's VAE.

Decoding the latents with the VAE at every previewed step would cost as much as the final decode; a linear
projection of the latent channels to RGB costs almost nothing and shows the composition and colours. Instead of
hard-coding per-family coefficients, the map is fitted once at start-up by least squares: smooth random
images are encoded with the loaded model's own VAE, and each latent pixel is matched with the mean colour of
the image block it covers. So it fits every family (4-channel SD/SDXL latents, 16-channel SD3/Flux latents)
and any swapped VAE.
"""

import io
import logging

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

FIT_IMAGES, FIT_SIDE, FIT_CELLS = 4, 128, 8  # 4 images of 128x128, each an 8x8 grid of smoothed random colours
PREVIEW_JPEG_QUALITY = 70


class LatentPreviewer:
    """Turns one image's in-loop latents into a small RGB preview (uint8, latent-sized)."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.weights = _fit_projection(pipeline.vae)

    def preview(self, latents: torch.Tensor, index: int, height: int, width: int) -> np.ndarray:
        """The preview of image ``index`` of a call's latents (``width`` x ``height`` is the image size)."""
        latents = latents.detach()
        unpack = getattr(type(self.pipeline), "_unpack_latents", None)
        if latents.ndim == 3 and unpack is not None:  # Flux packs 2x2 latent patches into its tokens
            latents = unpack(latents[index:index + 1], height, width, self.pipeline.vae_scale_factor)[0]
        else:
            latents = latents[index]
        channels = latents.to(torch.float32).cpu().permute(1, 2, 0).numpy()  # h x w x C
        features = np.concatenate([channels, np.ones(channels.shape[:2] + (1,), np.float32)], axis=-1)
        rgb = features @ self.weights
        return (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)


def preview_jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
    return buffer.getvalue()


def _fit_projection(vae) -> np.ndarray:
    """Least-squares weights (C + 1) x 3 from in-loop latents (plus a bias) to RGB in [0, 1]."""
    generator = torch.Generator("cpu").manual_seed(0)
    cells = torch.rand((FIT_IMAGES, 3, FIT_CELLS, FIT_CELLS), generator=generator)
    images = torch.nn.functional.interpolate(cells, size=(FIT_SIDE, FIT_SIDE), mode="bilinear", align_corners=False)
    parameter = next(vae.parameters())
    with torch.inference_mode():
        encoded = vae.encode((images * 2 - 1).to(parameter.device, parameter.dtype)).latent_dist.mean
    config = vae.config
    latents = encoded.to(torch.float32).cpu()
    if getattr(config, "shift_factor", None) is not None:
        latents = latents - config.shift_factor
    latents = latents * config.scaling_factor  # what the denoising loop holds
    targets = torch.nn.functional.adaptive_avg_pool2d(images, latents.shape[-2:])
    features = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).numpy()
    features = np.concatenate([features, np.ones((len(features), 1), np.float32)], axis=1)
    colours = targets.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    weights, *_ = np.linalg.lstsq(features, colours, rcond=None)
    residual = float(np.sqrt(np.mean((features @ weights - colours) ** 2)))
    logger.info("fitted the latent preview projection (%d channels): RMS error %.3f", latents.shape[1], residual)
    return weights.astype(np.float32)
