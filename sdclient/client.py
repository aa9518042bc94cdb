"""A small client: send a generation request to the served model, save the images, print the seeds.

    python -m sdclient "a red fox" -o fox.png --seed 7 --steps 20
    python -m sdclient "a red fox" --stream --preview previews/   # a progress bar, and the previews
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
from typing import Iterator, Optional

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
    response = _post(prompt, url, model, token, timeout, {**fields, "output_format": "json"}, stream=False)
    return reply_of(response.json())


def stream(prompt: str, url: str = DEFAULT_URL, model: str = "stable_diffusion", token: Optional[str] = None,
           timeout: float = 900, **fields) -> Iterator[dict]:
    """Ask for a streamed generation and yield its events as they arrive: ``progress`` events (``step``,
    ``total``, ``elapsed_ms``, ``eta_ms``, maybe ``preview``), then one ``result`` or ``error`` event.
    ``timeout`` bounds the wait for each line, not the whole generation."""
    with _post(prompt, url, model, token, timeout, {**fields, "stream": True}, stream=True) as response:
        for line in response.iter_lines():
            if line:
                yield json.loads(line)


def reply_of(document: dict) -> GenerationReply:
    """The images, seeds and parameters of a ``json`` response or a stream's ``result`` event."""
    images = [Image.open(io.BytesIO(base64.b64decode(item))) for item in document["images"]]
    return GenerationReply(images=images, seeds=document["seeds"], parameters=document["parameters"])


def _post(prompt: str, url: str, model: str, token: Optional[str], timeout: float, fields: dict, stream: bool):
    token = token or read_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"prompt": prompt, **{name: value for name, value in fields.items() if value is not None}}
    response = requests.post(f"{url}/predictions/{model}", json=body, headers=headers, timeout=timeout, stream=stream)
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        response.close()
        raise GenerationFailed(f"HTTP {response.status_code}: {message}")
    return response


def follow_stream(events: Iterator[dict], preview_dir: Optional[Path] = None) -> GenerationReply:
    """Show a stream's progress as a bar (step and ETA), save its previews, and return its result."""
    from tqdm import tqdm

    with tqdm(unit="step", desc="denoising", file=sys.stderr) as bar:
        for event in events:
            if event["event"] == "progress":
                bar.total = event["total"]
                bar.update(event["step"] - bar.n)
                bar.set_postfix(eta=f"{event['eta_ms'] / 1000:.1f}s")
                if preview_dir is not None and "preview" in event:
                    preview_dir.mkdir(parents=True, exist_ok=True)
                    (preview_dir / f"preview-{event['step']:04d}.jpg").write_bytes(base64.b64decode(event["preview"]))
            elif event["event"] == "result":
                return reply_of(event)
            else:
                error = event["error"]
                raise GenerationFailed(f"{error['reason']} ({error['code']}): {error['message']}")
    raise GenerationFailed("the stream ended without a result")


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
    parser.add_argument("--timeout", dest="timeout_seconds", type=float,
                        help="ask the server to stop the generation after this many seconds")
    parser.add_argument("--stream", action="store_true", help="show a progress bar with the step and ETA while "
                                                              "the server generates")
    parser.add_argument("--preview", type=Path, metavar="DIR",
                        help="with --stream: save the server's previews in DIR as preview-STEP.jpg")
    parser.add_argument("--preview-every", type=int, default=5, help="with --preview: a preview every N steps "
                                                                      "(default: %(default)s)")
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
    if arguments.preview and not arguments.stream:
        parser.error("--preview goes with --stream")
    fields = {name: getattr(arguments, name) for name in (
        "seed", "num_inference_steps", "guidance_scale", "width", "height", "negative_prompt", "scheduler",
        "num_images", "strength", "timeout_seconds")}
    if arguments.image:
        fields["image"] = image_to_base64(arguments.image)
    if arguments.mask:
        fields["mask_image"] = image_to_base64(arguments.mask)
    target = dict(url=arguments.url, model=arguments.model, token=read_token(arguments.token_file))
    try:
        if arguments.stream:
            fields["preview_every"] = arguments.preview_every if arguments.preview else None
            reply = follow_stream(stream(arguments.prompt, **target, **fields), arguments.preview)
        else:
            print(f"sdclient: generating at {arguments.url} (the server answers when the images are done; "
                  "--stream shows progress)", file=sys.stderr)
            reply = generate(arguments.prompt, **target, **fields)
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
