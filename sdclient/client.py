"""A small client: send a generation request to the served model, save the images, print the seeds.

    python -m sdclient "a red fox" -o fox.png --seed 7 --steps 20
    python -m sdclient --describe     # what the served model accepts (management API)

From Python: ``generate("a red fox", seed=7, num_inference_steps=20)`` returns the images and seeds.
The token is read from TorchServe's key_file.json (``--token-file``) or the TORCHSERVE_TOKEN variable.
"""

import argparse
import base64
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import requests
from PIL import Image

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
TOKEN_FILES = (Path("key_file.json"), Path("run") / "key_file.json")


@dataclass
class GenerationReply:
    """What the server made: the images, their seeds and the parameters it used."""

    images: list[Image.Image]
    seeds: list[int]
    parameters: dict


class GenerationFailed(RuntimeError):
    """The server answered with an error; the message is the server's."""


def read_token(token_file: Optional[Path] = None, kind: str = "inference") -> Optional[str]:
    """A TorchServe token (``kind`` is ``inference`` or ``management``): from ``token_file`` if given, else the
    TORCHSERVE_TOKEN variable (inference only), else ./key_file.json or ./run/key_file.json."""
    if token_file is None and kind == "inference" and os.environ.get("TORCHSERVE_TOKEN"):
        return os.environ["TORCHSERVE_TOKEN"]
    for candidate in ([token_file] if token_file else TOKEN_FILES):
        if candidate.is_file():
            return json.loads(candidate.read_text())[kind]["key"]
    return None


def describe(url: str = DEFAULT_MANAGEMENT_URL, model: str = "stable_diffusion", token: Optional[str] = None,
             timeout: float = 30) -> dict:
    """The served model's ``request_schema`` and ``capabilities`` (``GET /models/{model}?customized=true``)."""
    token = token or read_token(kind="management")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = requests.get(f"{url}/models/{model}", params={"customized": "true"}, headers=headers, timeout=timeout)
    if response.status_code != 200:
        raise GenerationFailed(f"HTTP {response.status_code}: {response.text[:500]}")
    metadata = response.json()[0].get("customizedMetadata")
    return json.loads(metadata) if isinstance(metadata, str) else metadata


def image_to_base64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def generate(prompt: str, url: str = DEFAULT_URL, model: str = "stable_diffusion", token: Optional[str] = None,
             timeout: float = 900, **fields) -> GenerationReply:
    """Ask the server for images; ``fields`` are request fields (seed, num_inference_steps, width, ...)."""
    token = token or read_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"prompt": prompt, **{name: value for name, value in fields.items() if value is not None},
            "output_format": "json"}
    response = requests.post(f"{url}/predictions/{model}", json=body, headers=headers, timeout=timeout)
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        raise GenerationFailed(f"HTTP {response.status_code}: {message}")
    reply = response.json()
    images = [Image.open(io.BytesIO(base64.b64decode(item))) for item in reply["images"]]
    return GenerationReply(images=images, seeds=reply["seeds"], parameters=reply["parameters"])


def output_paths(output: Path, count: int) -> list[Path]:
    """fox.png for one image; fox-0.png, fox-1.png, ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdclient", description=__doc__.splitlines()[0],
                                     epilog="Fields left out take the server's defaults (see --describe).")
    parser.add_argument("prompt", nargs="?", help="what to draw (required unless --describe)")
    parser.add_argument("-o", "--output", type=Path, default=Path("image.png"),
                        help="where to save the PNG; with several images NAME-0.png, NAME-1.png, ... "
                             "(default: %(default)s)")
    parser.add_argument("--describe", action="store_true",
                        help="print the served model's request schema and capabilities as JSON, and exit")
    parser.add_argument("--url", default=DEFAULT_URL, help="TorchServe inference address (default: %(default)s)")
    parser.add_argument("--management-url", default=DEFAULT_MANAGEMENT_URL,
                        help="TorchServe management address, for --describe (default: %(default)s)")
    parser.add_argument("--model", default="stable_diffusion", help="model name in TorchServe (default: %(default)s)")
    parser.add_argument("--token-file", type=Path, help="TorchServe key_file.json (default: ./key_file.json, "
                                                        "then ./run/key_file.json)")
    parser.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i (default: random)")
    parser.add_argument("--steps", dest="num_inference_steps", type=int, help="denoising steps")
    parser.add_argument("--guidance", dest="guidance_scale", type=float, help="guidance scale (prompt adherence)")
    parser.add_argument("--width", type=int, help="image width in pixels (a multiple of the model's size multiple)")
    parser.add_argument("--height", type=int, help="image height in pixels")
    parser.add_argument("--negative", dest="negative_prompt", help="negative prompt: what to steer away from")
    parser.add_argument("--scheduler", help="sampler name, e.g. euler_a or dpmpp_2m_karras (see --describe)")
    parser.add_argument("--num-images", dest="num_images", type=int, help="images to make from the prompt")
    parser.add_argument("--image", type=Path, help="input image (PNG, JPEG or WebP) for image-to-image")
    parser.add_argument("--mask", type=Path, help="mask for inpainting (white = repaint); needs --image")
    parser.add_argument("--strength", type=float, help="how much to change --image, 0 < strength <= 1")
    arguments = parser.parse_args(argv)
    if arguments.describe:
        try:
            described = describe(arguments.management_url, arguments.model,
                                 read_token(arguments.token_file, kind="management"))
        except (GenerationFailed, requests.RequestException) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(json.dumps(described, indent=2))
        return 0
    if arguments.prompt is None:
        parser.error("a prompt is required (or --describe)")
    fields = {name: getattr(arguments, name) for name in (
        "seed", "num_inference_steps", "guidance_scale", "width", "height", "negative_prompt", "scheduler",
        "num_images", "strength")}
    if arguments.image:
        fields["image"] = image_to_base64(arguments.image)
    if arguments.mask:
        fields["mask_image"] = image_to_base64(arguments.mask)
    print(f"sdclient: generating at {arguments.url} (the server answers when the images are done)", file=sys.stderr)
    try:
        reply = generate(arguments.prompt, url=arguments.url, model=arguments.model,
                         token=read_token(arguments.token_file), **fields)
    except (GenerationFailed, requests.RequestException) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for image, seed, path in zip(reply.images, reply.seeds, output_paths(arguments.output, len(reply.images))):
        image.save(path, pnginfo=_png_info(image))
        print(f"{path}  seed={seed}")
    return 0


def _png_info(image: Image.Image):
    """Keep the server's parameters chunk when re-saving, so the file still says how to make it again."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in getattr(image, "text", {}).items():
        info.add_text(key, value)
    return info


if __name__ == "__main__":
    sys.exit(main())
