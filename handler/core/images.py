"""Decode client-supplied images (image-to-image, inpainting) without trusting their headers.

A small PNG can declare a 60000x60000 canvas: the pixel count is checked from the header before any pixel
is decoded, so an image bomb is a 4xx and never an out-of-memory in the worker.
"""

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image

from handler.core.failures import IMAGE_TOO_LARGE, INVALID_IMAGE, Rejection, invalid

ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# Pillow's modes for 16- and 32-bit greyscale, with the largest value each can hold. Pillow's own convert()
# clips them to 255 (mid-grey becomes white), so they are scaled to 8 bits first.
WIDE_GREY_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def decode_image(field: str, value, max_pixels: int, mode: str) -> Image.Image:
    """Return the image in ``value`` converted to ``mode`` ("RGB" or "L").

    ``value`` is base64 or a data URL (JSON bodies), or the file's own bytes (a multipart form upload).
    """
    raw = value if isinstance(value, bytes) else _base64_payload(field, value)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=ALLOWED_IMAGE_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise invalid(field, f"{field} is {width}x{height} ({width * height} pixels); at most "
                              f"{max_pixels} pixels are allowed", reason=IMAGE_TOO_LARGE)
            image.load()
            return _to_eight_bits(image).convert(mode)
    except Rejection:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise invalid(field, f"{field} declares more pixels than allowed ({max_pixels})",
                      reason=IMAGE_TOO_LARGE) from None
    except Exception as error:  # Pillow raises many types for corrupt data; all mean "not an image".
        raise invalid(field, f"{field} is not a readable PNG, JPEG or WebP image ({type(error).__name__})",
                      reason=INVALID_IMAGE) from None


def _base64_payload(field: str, value: str) -> bytes:
    encoded = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    encoded = "".join(encoded.split())  # `base64 file.png` and encodebytes() wrap lines
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, f"{field} is neither a PNG, JPEG or WebP file nor valid base64 of one (or a data URL)",
                      reason=INVALID_IMAGE) from None


def _to_eight_bits(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image scaled to 8 bits (65535 -> 255), so its greys keep their brightness."""
    if image.mode not in WIDE_GREY_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    scaled = np.clip(values * (255.0 / WIDE_GREY_MODES[image.mode]), 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled, mode="L")
