"""Outpainting: an input image on a larger canvas, and the mask that makes the inpainting pipeline paint the
new border.

The canvas is the image plus the requested border on each side, grown on the right and at the bottom to the
next multiple of the model's size multiple (the pipelines refuse other sizes). The new border starts as the
image's edge pixels stretched outwards, so a strength below 1 continues the edge colours; the mask is white
on the whole border and black on the original image.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image

SIDES = ("left", "right", "top", "bottom")


@dataclass(frozen=True)
class Margins:
    """Pixels to add on each side of the input image."""

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0

    def canvas_size(self, width: int, height: int, multiple: int) -> tuple[int, int]:
        """The outpainted size of a ``width`` x ``height`` image, rounded up to ``multiple``."""
        return (_round_up(width + self.left + self.right, multiple),
                _round_up(height + self.top + self.bottom, multiple))


def extend_canvas(image: Image.Image, margins: Margins, multiple: int) -> tuple[Image.Image, Image.Image]:
    """The canvas (RGB) with ``image`` at its place and its edges stretched over the border, and the mask (L)."""
    width, height = canvas_size = margins.canvas_size(image.width, image.height, multiple)
    right = width - image.width - margins.left
    bottom = height - image.height - margins.top
    pixels = np.pad(np.asarray(image.convert("RGB")), ((margins.top, bottom), (margins.left, right), (0, 0)),
                    mode="edge")
    mask = np.full((canvas_size[1], canvas_size[0]), 255, dtype=np.uint8)
    mask[margins.top:margins.top + image.height, margins.left:margins.left + image.width] = 0
    return Image.fromarray(pixels, mode="RGB"), Image.fromarray(mask, mode="L")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
