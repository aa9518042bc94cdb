"""AUTOMATIC1111's infotext in every image file, parsed back by a reader written from A1111's documented format.

The reader below follows the format A1111 documents for ``parse_generation_parameters``: the prompt lines, a
line starting ``Negative prompt:``, and a last line of ``Key: value`` pairs split on ``", "``, where a value in
double quotes is a JSON string. It is written here from that description, not imported from the encoder.
"""

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from handler.core.encoding import EXIF_IFD, EXIF_USER_COMMENT, PNG_INFOTEXT_KEY, image_file

PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
ORDER = ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model", "Denoising strength",
         "Lora hashes"]


def parse_infotext(text: str) -> dict:
    """A1111's infotext -> {"Prompt", "Negative prompt", key: value, ...}, keys in the order written."""
    *lines, last = text.strip().split("\n")
    if len(PAIR.findall(last)) < 3:
        lines, last = lines + [last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    parsed = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in PAIR.findall(last):
        parsed[key] = json.loads(value) if value[:1] == '"' == value[-1:] else value
    return parsed


def read_infotext(body: bytes) -> str:
    picture = Image.open(io.BytesIO(body))
    if picture.format == "PNG":
        return picture.text[PNG_INFOTEXT_KEY]
    comment = picture.getexif().get_ifd(EXIF_IFD)[EXIF_USER_COMMENT]
    assert comment.startswith(b"UNICODE\x00")  # EXIF's UCS-2 character code, as A1111 (piexif) writes it
    return comment[8:].decode("utf-16-be")


PARAMETERS = {
    "prompt": "a lighthouse, at dusk: oil on canvas\nwide shot", "negative_prompt": "blurry, low quality",
    "num_inference_steps": 20, "guidance_scale": 7.5, "width": 512, "height": 768, "seeds": [41, 42],
    "scheduler": "dpmpp_2m_karras", "task": "image-to-image", "strength": 0.6, "model": "sd15-finetune",
    "loras": [{"name": "ink", "scale": 0.8}], "lora_hashes": {"ink": "0123456789ab", "pencil": "ba9876543210"},
}


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_every_image_file_carries_the_infotext(output_format):
    body = image_file(np.zeros((768, 512, 3), np.uint8), output_format, PARAMETERS, 42)
    parsed = parse_infotext(read_infotext(body))
    assert parsed["Prompt"] == PARAMETERS["prompt"]
    assert parsed["Negative prompt"] == "blurry, low quality"
    assert parsed["Steps"] == "20" and parsed["CFG scale"] == "7.5" and parsed["Seed"] == "42"
    assert parsed["Sampler"] == "DPM++ 2M Karras"
    assert parsed["Size"] == "512x768" and parsed["Model"] == "sd15-finetune"
    assert parsed["Denoising strength"] == "0.6"
    assert parsed["Lora hashes"] == "ink: 0123456789ab, pencil: ba9876543210"
    written = [key for key in parsed if key not in ("Prompt", "Negative prompt")]
    assert written == [key for key in ORDER if key in written]  # A1111's order


def test_text_to_image_leaves_out_what_does_not_apply():
    parameters = {key: value for key, value in PARAMETERS.items()
                  if key not in ("negative_prompt", "strength", "loras", "lora_hashes", "model")}
    text = read_infotext(image_file(np.zeros((8, 8, 3), np.uint8), "png", {**parameters, "scheduler": "euler_a"}, 7))
    assert "Negative prompt:" not in text
    parsed = parse_infotext(text)
    assert parsed["Sampler"] == "Euler a" and parsed["Seed"] == "7"
    assert not {"Denoising strength", "Lora hashes", "Model", "Schedule type"} & set(parsed)


@pytest.mark.parametrize("scheduler, sampler, schedule", [
    ("euler_a", "Euler a", None), ("euler", "Euler", None), ("ddim", "DDIM", None), ("pndm", "PLMS", None),
    ("lms", "LMS", None), ("heun", "Heun", None), ("unipc", "UniPC", None),
    ("dpmpp_2m_karras", "DPM++ 2M Karras", None),
    # A1111's DPM++ 2M runs Karras by default: the plain schedule must say so, or a re-run would differ.
    ("dpmpp_2m", "DPM++ 2M", "Uniform"),
    ("flow_match_euler", "Euler", None),
])
def test_schedulers_take_a1111_sampler_names(scheduler, sampler, schedule):
    parsed = parse_infotext(read_infotext(image_file(np.zeros((8, 8, 3), np.uint8), "png",
                                                     {**PARAMETERS, "scheduler": scheduler}, 1)))
    assert parsed["Sampler"] == sampler
    assert parsed.get("Schedule type") == schedule

