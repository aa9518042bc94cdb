"""What several test files need, written once: requests to a real TorchServe, small bodies and images, the
worker log, servers built from a modified model-config.yaml, and the contract of each model family.

Nothing here is a stand-in: every server is a real TorchServe serving a .mar built by build_mar.sh, and every
waiting function polls something the server reports (its workers, its log) up to a bound, never a fixed sleep.
"""

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import requests
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "stable_diffusion"
# A request that takes a few hundred milliseconds on a CPU: the smallest side the contract allows.
SMALL = {"num_inference_steps": 2, "width": 64, "height": 64}
CONTROLNET_NAMES = ("edges", "depth")  # the ControlNets of the family_contracts() SD1 that has some


# --- Requests to a served model ----------------------------------------------------------------------------------

def predict(server, body: Optional[dict] = None, *, data=None, headers: Optional[dict] = None, model: str = MODEL,
            route: str = "predictions", timeout: float = 300) -> requests.Response:
    """POST to ``/{route}/{model}`` with the inference token.

    ``body``: a dict sent as JSON with ``json.dumps`` (which writes NaN and Infinity as bare tokens, as a careless
    client would); ``data``: bytes, text or a dict (a form) sent as they are. ``headers`` add to the token.
    """
    sent_headers = dict(server.inference_headers())
    if body is not None:
        data = json.dumps(body).encode()
        sent_headers["Content-Type"] = "application/json"
    sent_headers.update(headers or {})
    return requests.post(f"{server.inference_url}/{route}/{model}", data=data, headers=sent_headers,
                         timeout=timeout)


def management(server, method: str, path: str, timeout: float = 300) -> requests.Response:
    """A management API call with the management token, e.g. ``management(server, "GET", "/models")``."""
    return requests.request(method, f"{server.management_url}{path}", headers=server.management_headers(),
                            timeout=timeout)


def scale(server, min_workers: int, max_workers: int, model: str = MODEL) -> None:
    """Set a model's worker range and wait (synchronous=true) until TorchServe has applied it."""
    response = management(server, "PUT", f"/models/{model}?min_worker={min_workers}&max_worker={max_workers}"
                                         "&synchronous=true")
    assert response.status_code == 200, response.text


def wait_for_workers(server, count: int, model: str = MODEL, timeout: float = 180) -> None:
    """Wait until ``model`` has exactly ``count`` READY workers."""
    deadline = time.monotonic() + timeout
    while server.ready_workers(model) != count:
        assert time.monotonic() < deadline, \
            f"{model} has {server.ready_workers(model)} READY workers, not {count}, after {timeout} s"
        time.sleep(0.5)


def error_of(response: requests.Response) -> dict:
    """The ``error`` object of an error response (every handler error has the same shape)."""
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.headers
    error = response.json()["error"]
    assert error["code"] == response.status_code and error["message"], error
    return error


# --- Prompts -------------------------------------------------------------------------------------------------------

# Two prompts longer than CLIP's 77-token window that differ only after it (the tiny tokenizer has one token per
# non-space character): plain truncation gives them the same image, chunked encoding does not.
LONG_PROMPT = "a lighthouse on a cliff above a stormy sea, waves, spray, gulls, dramatic clouds, oil painting at dusk"
LONG_PROMPT_CHANGED = LONG_PROMPT[:-4] + "dawn"


# --- Response bodies ---------------------------------------------------------------------------------------------

def npy(response: requests.Response) -> np.ndarray:
    """The array of an ``output_format: npy`` response (which must be a 200)."""
    assert response.status_code == 200, response.text[:300]
    return np.load(io.BytesIO(response.content), allow_pickle=False)


def json_images(result: dict) -> list[np.ndarray]:
    """The images of an ``output_format: json`` body, decoded from their base64 PNGs."""
    return [np.array(Image.open(io.BytesIO(base64.b64decode(image)))) for image in result["images"]]


# --- Input images ------------------------------------------------------------------------------------------------

def solid(width: int, height: int, value: int = 128, mode: str = "RGB") -> np.ndarray:
    """A flat uint8 image (RGB: height x width x 3; L: height x width)."""
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return np.full(shape, value, dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(array: np.ndarray, data_url: bool = False) -> str:
    """An image as a JSON image field takes it: base64, optionally as a data URL."""
    encoded = base64.b64encode(png_bytes(array)).decode("ascii")
    return "data:image/png;base64," + encoded if data_url else encoded


# --- The worker log ----------------------------------------------------------------------------------------------

def model_log(server) -> str:
    """Everything the server's workers have logged so far (logs/model_log.log)."""
    path = Path(server.folder) / "logs" / "model_log.log"
    return path.read_text(errors="replace") if path.exists() else ""


def log_offset(server) -> int:
    """Where the worker log ends now: pass it to ``log_since`` to read only what a test itself caused."""
    return len(model_log(server))


def log_since(server, offset: int) -> str:
    return model_log(server)[offset:]


def wait_for_log(server, pattern: str, offset: int = 0, timeout: float = 120) -> re.Match:
    """Wait until the worker log, from ``offset`` on, has a line matching ``pattern``; return the match."""
    deadline = time.monotonic() + timeout
    while True:
        match = re.search(pattern, log_since(server, offset))
        if match:
            return match
        assert time.monotonic() < deadline, f"no log line matching {pattern!r} after {timeout} s"
        time.sleep(0.1)


GENERATING = r"worker (\d+) generating for (\d+) request\(s\)"  # logged as each batch's inference starts


@dataclass
class Batch:
    """One call of the handler as its worker logged it."""

    worker: str  # the TorchServe worker thread, e.g. W-9000
    size: int  # requests TorchServe put in the call
    generating: int  # those that reached generation (the rest were rejected)
    rejections: list[str]  # the rejected requests' log messages


def batches_in(log: str) -> list[Batch]:
    """The handler calls in a piece of the worker log: each call logs its rejections, then "generating for N
    request(s)", then "generated K image(s) for M request(s)" (M: the whole batch), all from its worker."""
    line_pattern = re.compile(r"(W-\d+)-\S+ MODEL_LOG - (.*)")
    open_calls: dict[str, dict[str, Any]] = {}
    batches = []
    for line in log.splitlines():
        match = line_pattern.search(line)
        if not match:
            continue
        worker, message = match.groups()
        call = open_calls.setdefault(worker, {"rejections": [], "generating": None})
        if message.startswith("rejected request"):
            call["rejections"].append(message)
        elif generating := re.match(GENERATING, message):
            call["generating"] = int(generating.group(2))
        elif done := re.match(r"worker \d+ generated \d+ image\(s\) for (\d+) request\(s\)", message):
            batches.append(Batch(worker, int(done.group(1)), call["generating"] or 0, call["rejections"]))
            del open_calls[worker]
        elif message.startswith("Backend received inference"):
            open_calls[worker] = {"rejections": [], "generating": None}
    return batches


# --- Archives and servers ----------------------------------------------------------------------------------------

def run_build_mar(*arguments) -> None:
    """Run build_mar.sh as a user would, with the Python running the tests."""
    subprocess.run([str(REPO_ROOT / "build_mar.sh"), *map(str, arguments)], check=True,
                   env={**os.environ, "PYTHON": sys.executable})


def shipped_model_config() -> dict:
    return yaml.safe_load((REPO_ROOT / "model-config.yaml").read_text())


def build_tiny_mar(work: Path, worker_settings: Optional[dict] = None, handler_settings: Optional[dict] = None,
                   family: str = "sd1") -> Path:
    """``work/store/stable_diffusion.mar`` built by build_mar.sh --tiny from the shipped model-config.yaml with
    ``worker_settings`` (minWorkers, batchSize, ...) and ``handler_settings`` (its handler: section) changed."""
    config = write_model_config(work / "model-config.yaml", worker_settings, handler_settings)
    run_build_mar("--tiny", "--family", family, "--config-file", config, "--export-path", work / "store",
                  "--work-dir", work / "scratch")
    return work / "store" / f"{MODEL}.mar"


def write_model_config(path: Path, worker_settings: Optional[dict] = None,
                       handler_settings: Optional[dict] = None) -> Path:
    """The shipped model-config.yaml with some worker settings and handler: settings changed, at ``path``."""
    config = shipped_model_config()
    config.update(worker_settings or {})
    config["handler"] = {**(config.get("handler") or {}), **(handler_settings or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def start_server(folder: Path, mar: Path, workers: int = 1, timeout: float = 300):
    """A started LocalTorchServe in ``folder`` serving ``mar`` as stable_diffusion, once ``workers`` workers are
    READY (LocalTorchServe.start returns at the first READY one)."""
    from harness.local_server import LocalTorchServe

    server = LocalTorchServe(folder, mar.parent, {MODEL: mar.name})
    server.start(timeout=timeout)
    try:
        wait_for_workers(server, workers, timeout=timeout)
    except BaseException:
        server.stop()
        raise
    return server


def stop_server(server) -> None:
    """Stop a server and check that none of its processes is left."""
    processes = server.processes()
    server.stop()
    assert not [process for process in processes if process.is_running() and process.status() != "zombie"], \
        "TorchServe left processes running after stop"


# --- The contract of each model family ---------------------------------------------------------------------------

def capabilities_of_family(family: str, tasks: Optional[tuple[str, ...]] = None):
    """The ModelCapabilities a loaded pipeline of ``family`` reports, from builder/families.py's facts (which
    test_tiny_families checks against each tiny pipeline's capabilities_of)."""
    from builder.families import FAMILY_INFO
    from handler.core.capabilities import TASKS, ModelCapabilities, family_of
    from handler.core.schedulers import DISCRETE, scheduler_names

    info = FAMILY_INFO[family]
    schedulers = scheduler_names(info.scheduler_kind)
    return ModelCapabilities(
        pipeline_class=info.pipeline_class, size_multiple=info.size_multiple, schedulers=schedulers,
        negative_prompt=info.negative_prompt, tasks=TASKS if tasks is None else tasks,
        default_scheduler="pndm" if info.scheduler_kind == DISCRETE else schedulers[0],
        family=family_of(info.pipeline_class),
    )


def family_contracts(settings=None) -> dict:
    """A Contract per family (builder/families.py), plus an SD1 that offers text-to-image only (a pipeline
    whose image-to-image and inpainting variants could not be set up) and an SD1 with two ControlNets;
    default settings unless given."""
    from dataclasses import replace

    from builder.families import FAMILIES
    from handler.core.capabilities import IMAGE_TO_IMAGE, TEXT_TO_IMAGE
    from handler.core.contract import Contract
    from handler.core.settings import HandlerSettings

    settings = settings or HandlerSettings()
    contracts = {family: Contract(settings, capabilities_of_family(family)) for family in FAMILIES}
    contracts["sd1-text-to-image-only"] = Contract(settings, capabilities_of_family("sd1", (TEXT_TO_IMAGE,)))
    contracts["sd1-controlnets"] = Contract(settings, replace(
        capabilities_of_family("sd1"), controlnets=CONTROLNET_NAMES, controlnet_tasks=(TEXT_TO_IMAGE, IMAGE_TO_IMAGE)))
    return contracts


def shipped_settings():
    """HandlerSettings from the shipped model-config.yaml's handler: section."""
    from handler.core.settings import HandlerSettings

    return HandlerSettings.from_mapping(shipped_model_config().get("handler"))


# --- The protocols in-process ---------------------------------------------------------------------------------------

def read_native(contract, row: dict, headers: dict):
    """The native protocol's reading of one request as TorchServe hands it over: its ClientRequest, or it
    raises the Rejection that answers it."""
    from handler.protocols.http import HttpRequest, ServedModel
    from handler.protocols.native import NativeProtocol

    return NativeProtocol(contract, ServedModel(MODEL)).read(HttpRequest(row, headers)).request


# --- In-process TorchServe context -------------------------------------------------------------------------------

def make_context(model_dir: Path, handler_settings: dict | None = None, batch_size: int = 1):
    """A TorchServe Context as the worker builds it, for a model unpacked in ``model_dir``."""
    import ts
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    return Context(MODEL, str(model_dir), None, batch_size, None, "0.12.0", metrics=metrics,
                   model_yaml_config={"handler": handler_settings or {}})


def set_requests(context, headers: list[dict]):
    """Attach one RequestProcessor per request, as the worker does before calling handle()."""
    from ts.context import RequestProcessor

    context.request_processor = [RequestProcessor(dict(header)) for header in headers]
    context.request_ids = {index: f"request-{index}" for index in range(len(headers))}
