"""Decode client-supplied images (image-to-image, inpainting) without trusting their headers.

A small PNG can declare a 60000x60000 canvas: the pixel count is checked from the header before any pixel
is decoded, so an image bomb is a 4xx and never an out-of-memory in the worker.
"""

import base64
import binascii
import io
import warnings

from PIL import Image

from handler.errors import RequestError, invalid

ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def decode_image(field: str, value, max_pixels: int, mode: str) -> Image.Image:
    """Return the image in ``value`` (base64 or a data URL) converted to ``mode`` ("RGB" or "L")."""
    if not isinstance(value, str) or not value:
        raise invalid(field, f"{field} must be a base64 string or a data URL (data:image/png;base64,...)")
    encoded = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    encoded = "".join(encoded.split())  # `base64 file.png` and encodebytes() wrap lines
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, f"{field} is not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=ALLOWED_IMAGE_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise invalid(
                    field,
                    f"{field} is {width}x{height} ({width * height} pixels); at most {max_pixels} pixels are allowed",
                    status=413,
                    reason="image_too_large",
                )
            image.load()
            return image.convert(mode)
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise invalid(field, f"{field} declares more pixels than allowed ({max_pixels})", status=413,
                      reason="image_too_large") from None
    except Exception as error:  # Pillow raises many types for corrupt data; all mean "not an image".
        raise invalid(field, f"{field} is not a readable PNG, JPEG or WebP image ({type(error).__name__})") from None
