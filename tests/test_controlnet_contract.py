"""The ControlNet and outpainting fields in process: what the contract makes of them, and the canvas."""

import numpy as np
import pytest
from PIL import Image

from handler.core.contract import Contract
from handler.core.failures import Rejection
from handler.core.outpaint import Margins, extend_canvas
from helpers import CONTROLNET_NAMES, SMALL, family_contracts, png_base64, solid

CONTRACT = family_contracts()["sd1-controlnets"]
EDGES, DEPTH = CONTROLNET_NAMES
STEP = solid(80, 72, 0)
STEP[:, 40:] = 255  # one vertical edge
STEP_IMAGE = png_base64(STEP)


def parse(contract: Contract, **fields):
    return contract.parse({"prompt": "a cat", "seed": 1, **SMALL, **fields})


def test_one_scale_and_one_preprocess_apply_to_every_controlnet_and_images_take_the_output_size():
    request = parse(CONTRACT, controlnet=[EDGES, DEPTH], control_image=[STEP_IMAGE, STEP_IMAGE],
                    controlnet_conditioning_scale=0.5, control_preprocess="canny")
    control = request.control
    assert control.names == (EDGES, DEPTH) and control.scales == (0.5, 0.5)
    assert all(image.size == (64, 64) for image in control.images)
    edges = np.asarray(control.images[0])
    assert set(np.unique(edges)) <= {0, 255} and 0 < (edges == 255).mean() < 0.2  # a thin line, not the step
    as_sent = parse(CONTRACT, controlnet=EDGES, control_image=STEP_IMAGE).control
    assert np.asarray(as_sent.images[0]).mean() > 100  # none: the map as sent (half white)
    assert as_sent.batch_key() != control.batch_key()


def test_a_model_without_controlnets_refuses_the_fields_saying_how_to_pack_them():
    with pytest.raises(Rejection) as caught:
        parse(family_contracts()["sd1"], controlnet=EDGES, control_image=STEP_IMAGE)
    assert caught.value.field == "controlnet" and "--controlnet" in caught.value.message


def test_controlnet_with_a_mask_is_refused():
    with pytest.raises(Rejection) as caught:
        parse(CONTRACT, controlnet=EDGES, control_image=STEP_IMAGE, image=STEP_IMAGE, mask_image=STEP_IMAGE)
    assert caught.value.field == "controlnet" and "mask_image" in caught.value.message


def test_the_outpainted_canvas_keeps_the_image_and_masks_exactly_the_new_border():
    image = Image.fromarray(np.arange(30 * 20 * 3, dtype=np.uint8).reshape(20, 30, 3))
    canvas, mask = extend_canvas(image, Margins(left=3, top=2, bottom=1), multiple=8)
    assert canvas.size == mask.size == (40, 24)  # 30 + 3 -> 40 (right border grows), 20 + 3 -> 24
    pixels, masked = np.asarray(canvas), np.asarray(mask)
    assert (pixels[2:22, 3:33] == np.asarray(image)).all()
    assert (masked[2:22, 3:33] == 0).all() and masked.sum() == 255 * (40 * 24 - 30 * 20)
    assert (pixels[0, 3:33] == np.asarray(image)[0]).all()  # the border starts as the edge stretched out


@pytest.mark.parametrize("outpaint, words", [
    ({"left": 0}, ["at least one pixel"]),
    ({"middle": 8}, ["left", "bottom"]),
    ({"left": True}, ["outpaint.left"]),
    ({"right": 1000}, ["1080", "1024"]),
])
def test_outpaint_mistakes_name_the_field(outpaint, words):
    with pytest.raises(Rejection) as caught:
        CONTRACT.parse({"prompt": "a cat", "image": STEP_IMAGE, "outpaint": outpaint})
    assert caught.value.field == "outpaint"
    assert all(word in caught.value.message for word in words), caught.value.message
