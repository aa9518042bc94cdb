"""The prepare step: a checked request's input images decoded and transformed for the pipeline.

As diffusers separates ``check_inputs`` from ``prepare_*``, the contract first reads and checks every field
(cheap), and only then are the images decoded here, outpainted onto a larger canvas, sized to the output and,
for ControlNets, turned into condition maps (Canny edges).
"""

from typing import Any, Mapping, Optional

from PIL import Image

from handler.core.controlnets import CANNY, ControlCondition, canny_edges
from handler.core.failures import invalid
from handler.core.fields import FieldSpec
from handler.core.outpaint import Margins, extend_canvas
from handler.core.settings import HandlerSettings

# How a client resizes an input image that does not fit, as the native fields say it (the OpenAI API says size).
RESIZE_HINT = "pass width and height to resize it"


def input_images(fields: Mapping[str, FieldSpec], values: Mapping[str, Any]) \
        -> tuple[Optional[Image.Image], Optional[Image.Image]]:
    """The decoded ``image`` and ``mask_image``, where given."""
    image, mask_image = (fields[name].type.decode(name, values[name]) if name in values else None
                         for name in ("image", "mask_image"))
    return image, mask_image


def outpainted(image: Image.Image, margins: Margins, num_images: int, settings: HandlerSettings,
               multiple: int) -> tuple[Image.Image, Image.Image]:
    """The canvas and border mask of an outpainting request, once its size is known to fit the limits."""
    width, height = margins.canvas_size(image.width, image.height, multiple)
    for side, name in ((width, "width"), (height, "height")):
        if not settings.min_side <= side <= settings.max_side:
            raise invalid("outpaint", f"the outpainted canvas is {width}x{height}: its {name} ({side}) is "
                          f"outside {settings.min_side} .. {settings.max_side}; change the borders or the image")
    if width * height > settings.max_pixels or width * height * num_images > settings.max_request_pixels:
        raise invalid("outpaint", f"the outpainted canvas is {width}x{height} = {width * height} pixels "
                      f"(x {num_images} images); at most {settings.max_pixels} pixels an image and "
                      f"{settings.max_request_pixels} a request are allowed")
    return extend_canvas(image, margins, multiple)


def side_of(image: Image.Image, name: str, settings: HandlerSettings, multiple: int) -> int:
    """An input image's side rounded down to the size multiple; must fit the side limits as it is."""
    side = (image.width if name == "width" else image.height) // multiple * multiple
    if not settings.min_side <= side <= settings.max_side:
        raise invalid("image", f"the input image's {name} ({side}) is outside {settings.min_side} .. "
                      f"{settings.max_side}; {RESIZE_HINT}")
    return side


def sized(image: Image.Image, mask_image: Optional[Image.Image], width: int, height: int) \
        -> tuple[Image.Image, Optional[Image.Image]]:
    """The image (smoothly) and its mask (sharply) resized to the output size."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    if mask_image is not None and mask_image.size != (width, height):
        mask_image = mask_image.resize((width, height), Image.Resampling.NEAREST)
    return image, mask_image


def control_condition(fields: Mapping[str, FieldSpec], values: Mapping[str, Any], width: int,
                      height: int) -> ControlCondition:
    """The ControlNet condition: the control images decoded, sized to the output and preprocessed."""
    names = values["controlnet"]

    def given(name):
        return values.get(name, fields[name].default)

    def per_controlnet(name):
        chosen = values.get(name, (fields[name].default,))
        return chosen * len(names) if len(chosen) == 1 else chosen

    item = fields["control_image"].type.item
    images = []
    for encoded, preprocess in zip(values["control_image"], per_controlnet("control_preprocess")):
        control_image = item.decode("control_image", encoded)
        if control_image.size != (width, height):
            control_image = control_image.resize((width, height), Image.Resampling.LANCZOS)
        images.append(canny_edges(control_image, given("canny_low"), given("canny_high")) if preprocess == CANNY
                      else control_image)
    return ControlCondition(names, tuple(images), per_controlnet("controlnet_conditioning_scale"),
                            given("control_guidance_start"), given("control_guidance_end"))
