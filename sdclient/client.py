"""A small client: send a generation request to the served model, save the images, print the seeds.

    python -m sdclient "a red fox" -o fox.png --seed 7 --steps 20
    python -m sdclient "a red fox" --stream --preview previews/   # a progress bar, and the previews
    python -m sdclient "a red fox" --lora anime:0.8 --controlnet edges --control-image fox.png --canny
    python -m sdclient --describe     # what the served model accepts (management API)
    python -m sdclient --wait-ready   # wait until the model has a READY worker (after a start)

From Python: ``generate("a red fox", seed=7, num_inference_steps=20)`` returns the images and seeds.
The token is read from TorchServe's key_file.json (``--token-file``) or the TORCHSERVE_TOKEN variable.
"""

import argparse
import base64
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import requests
from PIL import Image

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
TOKEN_FILES = (Path("key_file.json"), Path("run") / "key_file.json")
DEFAULT_OUTPUT = "out/sdclient-{seed}.{format}"  # never in the current folder itself; out/ is ignored by git here
STALE_KEY_HINT = ("TorchServe refused the key: it writes new keys to key_file.json in the folder it was started "
                  "from, each time it starts, so a key file left by an earlier or another server is stale. Pass "
                  "--token-file FOLDER/key_file.json (or TORCHSERVE_TOKEN) for the server you are calling")


@dataclass
class GenerationReply:
    """What the server made: the images, their seeds and the parameters it used."""

    images: list[Image.Image]
    seeds: list[int]
    parameters: dict
    files: list[bytes]  # each image as the server encoded it (its format, with the parameters in its metadata)


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
        raise GenerationFailed(failure_message(response))
    metadata = response.json()[0].get("customizedMetadata")
    return json.loads(metadata) if isinstance(metadata, str) else metadata


def wait_ready(url: str = DEFAULT_MANAGEMENT_URL, model: str = "stable_diffusion", token_file: Optional[Path] = None,
               timeout: float = 300) -> float:
    """Wait until ``model`` has a READY worker (``/ping`` answers before the model is loaded); the seconds waited.

    The management key is read again on every try: a starting TorchServe writes its key file a moment later."""
    started = time.monotonic()
    while True:
        try:
            token = read_token(token_file, kind="management")
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = requests.get(f"{url}/models/{model}", headers=headers, timeout=10)
            workers = response.json()[0]["workers"] if response.status_code == 200 else []
            if any(worker["status"] == "READY" for worker in workers):
                return time.monotonic() - started
        except (requests.RequestException, ValueError, KeyError, IndexError):
            pass  # not up yet, or its key file not written yet
        if time.monotonic() - started > timeout:
            raise GenerationFailed(f"{model} has no READY worker at {url} after {timeout:.0f} s; see the server's "
                                   "logs/model_log.log")
        time.sleep(1)


def image_to_base64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def generate(prompt: str, url: str = DEFAULT_URL, model: str = "stable_diffusion", token: Optional[str] = None,
             timeout: float = 900, output_format: str = "png", **fields) -> GenerationReply:
    """Ask the server for images; ``fields`` are request fields (seed, num_inference_steps, width, ...).

    ``output_format`` png comes in the ``json`` answer (base64 PNGs); jpeg and webp come as a stream's result,
    the one answer that carries files of those formats for any number of images, with their seeds."""
    if output_format != "png":
        for event in stream(prompt, url, model, token, timeout, output_format=output_format, **fields):
            if event["event"] in ("result", "error"):
                return result_of(event)
        raise GenerationFailed("the stream ended without a result")
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
    files = [base64.b64decode(item) for item in document["images"]]
    return GenerationReply(images=[Image.open(io.BytesIO(file)) for file in files], seeds=document["seeds"],
                           parameters=document["parameters"], files=files)


def failure_message(response: requests.Response) -> str:
    """The server's error message, with a hint when TorchServe refused the key (its own 400, not the handler's)."""
    try:
        document = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:500]}"
    error = document.get("error") if isinstance(document, dict) else None
    if isinstance(error, dict) and "message" in error:
        return f"HTTP {response.status_code}: {error['message']}"
    if isinstance(document, dict) and document.get("type") == "InvalidKeyException":
        return f"HTTP {response.status_code}: {document.get('message')}\n{STALE_KEY_HINT}"
    return f"HTTP {response.status_code}: {response.text[:500]}"


def _post(prompt: str, url: str, model: str, token: Optional[str], timeout: float, fields: dict, stream: bool):
    token = token or read_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"prompt": prompt, **{name: value for name, value in fields.items() if value is not None}}
    response = requests.post(f"{url}/predictions/{model}", json=body, headers=headers, timeout=timeout, stream=stream)
    if response.status_code != 200:
        message = failure_message(response)
        response.close()
        raise GenerationFailed(message)
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
            else:
                return result_of(event)
    raise GenerationFailed("the stream ended without a result")


def result_of(event: dict) -> GenerationReply:
    """A stream's last event: its ``result``, or its ``error`` raised."""
    if event["event"] == "result":
        return reply_of(event)
    error = event["error"]
    raise GenerationFailed(f"{error['reason']} ({error['code']}): {error['message']}")


def output_paths(output: Path, count: int) -> list[Path]:
    """fox.png for one image; fox-0.png, fox-1.png, ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]


def lora_entry(text: str) -> dict:
    """``--lora anime`` or ``--lora anime:0.8`` -> {"name": "anime", "scale": 0.8}."""
    name, _, scale = text.partition(":")
    try:
        return {"name": name, **({"scale": float(scale)} if scale else {})}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora takes NAME or NAME:SCALE, got {text!r}") from None


def outpaint_borders(text: str) -> dict:
    """``--outpaint left=128,right=128`` -> {"left": 128, "right": 128}."""
    try:
        return {side.strip(): int(pixels) for side, pixels in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--outpaint takes SIDE=PIXELS[,SIDE=PIXELS...], got {text!r}") from None


def one_or_list(values: Optional[list]):
    """A repeatable option as a request field: one value as itself, several as a list, none as None."""
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def request_fields(arguments: argparse.Namespace) -> dict:
    """The request fields the command line sets (the others take the server's defaults)."""
    fields = {name: getattr(arguments, name) for name in (
        "seed", "num_inference_steps", "guidance_scale", "width", "height", "negative_prompt", "scheduler",
        "num_images", "strength", "timeout_seconds", "outpaint")}
    fields["loras"] = arguments.loras
    fields["controlnet"] = one_or_list(arguments.controlnet)
    fields["control_image"] = one_or_list([image_to_base64(path) for path in arguments.control_image or []])
    fields["control_preprocess"] = one_or_list(arguments.control_preprocess)
    fields["controlnet_conditioning_scale"] = one_or_list(arguments.control_scale)
    if arguments.image:
        fields["image"] = image_to_base64(arguments.image)
    if arguments.mask:
        fields["mask_image"] = image_to_base64(arguments.mask)
    return fields


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdclient", description=__doc__.splitlines()[0],
                                     epilog="Fields left out take the server's defaults (see --describe).")
    parser.add_argument("prompt", nargs="?", help="what to draw (required unless --describe or --wait-ready)")
    parser.add_argument("-o", "--output", type=Path,
                        help="where to save the image; with several images NAME-0.png, NAME-1.png, ... "
                             f"(default: {DEFAULT_OUTPUT}, with the first image's seed)")
    parser.add_argument("--format", dest="output_format", choices=("png", "jpeg", "webp"), default="png",
                        help="the image files' format (default: %(default)s)")
    parser.add_argument("--describe", action="store_true",
                        help="print the served model's request schema and capabilities as JSON, and exit")
    parser.add_argument("--wait-ready", nargs="?", type=float, const=300, metavar="SECONDS",
                        help="wait until the model has a READY worker (at most SECONDS, default 300), and exit")
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
    parser.add_argument("--outpaint", type=outpaint_borders, metavar="SIDE=PIXELS,...",
                        help="with --image: extend the canvas, e.g. left=128,right=128 (sides: left, right, top, "
                             "bottom)")
    parser.add_argument("--lora", dest="loras", type=lora_entry, action="append", metavar="NAME[:SCALE]",
                        help="apply one of the model's LoRAs, with its scale (default 1); repeatable")
    parser.add_argument("--controlnet", action="append", metavar="NAME",
                        help="steer with one of the model's ControlNets; repeatable, one --control-image each")
    parser.add_argument("--control-image", type=Path, action="append", metavar="PATH",
                        help="the condition map of each --controlnet (or a photo, with --control-preprocess canny)")
    parser.add_argument("--control-preprocess", action="append", choices=("none", "canny"),
                        help="per --control-image: none (it is the map) or canny (edges found by the server); "
                             "one value: all")
    parser.add_argument("--control-scale", type=float, action="append", metavar="SCALE",
                        help="how strongly each --controlnet steers (default 1); one value: all")
    parser.add_argument("--timeout", dest="timeout_seconds", type=float,
                        help="ask the server to stop the generation after this many seconds")
    parser.add_argument("--stream", action="store_true", help="show a progress bar with the step and ETA while "
                                                              "the server generates")
    parser.add_argument("--preview", type=Path, metavar="DIR",
                        help="with --stream: save the server's previews in DIR as preview-STEP.jpg")
    parser.add_argument("--preview-every", type=int, default=5, help="with --preview: a preview every N steps "
                                                                      "(default: %(default)s)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        if arguments.describe:
            print(json.dumps(describe(arguments.management_url, arguments.model,
                                      read_token(arguments.token_file, kind="management")), indent=2))
            return 0
        if arguments.wait_ready is not None:
            waited = wait_ready(arguments.management_url, arguments.model, arguments.token_file, arguments.wait_ready)
            print(f"sdclient: {arguments.model} has a READY worker (waited {waited:.0f} s)", file=sys.stderr)
            return 0
        if arguments.prompt is None:
            parser.error("a prompt is required (or --describe, or --wait-ready)")
        if arguments.preview and not arguments.stream:
            parser.error("--preview goes with --stream")
        reply = generate_from_command_line(arguments)
    except (GenerationFailed, requests.RequestException) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    output = arguments.output or Path(DEFAULT_OUTPUT.format(seed=reply.seeds[0], format=arguments.output_format))
    output.parent.mkdir(parents=True, exist_ok=True)
    for file, seed, path in zip(reply.files, reply.seeds, output_paths(output, len(reply.files))):
        path.write_bytes(file)
        print(f"{path}  seed={seed}")
    return 0


def generate_from_command_line(arguments: argparse.Namespace) -> GenerationReply:
    fields = request_fields(arguments)
    target = dict(url=arguments.url, model=arguments.model, token=read_token(arguments.token_file))
    if arguments.stream:
        fields["preview_every"] = arguments.preview_every if arguments.preview else None
        return follow_stream(stream(arguments.prompt, **target, output_format=arguments.output_format, **fields),
                             arguments.preview)
    print(f"sdclient: generating at {arguments.url} (the server answers when the images are done; "
          "--stream shows progress)", file=sys.stderr)
    return generate(arguments.prompt, **target, output_format=arguments.output_format, **fields)


if __name__ == "__main__":
    sys.exit(main())
