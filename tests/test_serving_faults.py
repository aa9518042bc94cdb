"""Faults and hostile input against a real TorchServe with two workers sharing one model directory."""

import itertools
import json
import os
import signal
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

from pathlib import Path

import pytest
import requests

from helpers import (
    GENERATING, MODEL, SMALL, build_tiny_mar, error_of, log_offset, model_log, predict, start_server, stop_server,
    wait_for_log, wait_for_workers,
)

pytestmark = pytest.mark.serving
# Long enough (minutes on a CPU) to be still running whenever a test acts on it once its generation has started.
SLOW = {"prompt": "a slow cat", "num_inference_steps": 150, "width": 768, "height": 768}


@pytest.fixture(scope="module")
def faults_mar(tmp_path_factory):
    """The tiny .mar with two workers per model (they start together and share one model directory)."""
    return build_tiny_mar(tmp_path_factory.mktemp("faults"), {"minWorkers": 2, "maxWorkers": 2}, {"warmup": False})


@pytest.fixture(scope="module")
def started_two_workers(faults_mar, tmp_path_factory):
    """(server, its worker log as it was once both workers were READY): later tests restart workers."""
    server = start_server(tmp_path_factory.mktemp("faults-server"), faults_mar, workers=2)
    try:
        yield server, model_log(server)
    finally:
        stop_server(server)


@pytest.fixture
def two_workers(started_two_workers):
    """The two-worker server, with both workers READY (a test that kills one waits for its replacement)."""
    server, _ = started_two_workers
    wait_for_workers(server, 2)
    return server


def post(server, data: bytes, content_type: str = "application/json", timeout: float = 120):
    return predict(server, data=data, headers={"Content-Type": content_type}, timeout=timeout)


def weight_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*.safetensors") if path.is_file())


def test_two_workers_starting_together_share_one_copy_of_the_weights(started_two_workers, faults_mar):
    """TorchServe extracts the .mar once into the shared model directory and both workers load the pipeline
    where it lies: the server's temporary folder holds exactly the archive's weights, once."""
    server, _ = started_two_workers
    with zipfile.ZipFile(faults_mar) as archive:
        archived = sum(entry.file_size for entry in archive.infolist() if entry.filename.endswith(".safetensors"))
    assert archived > 0
    assert weight_bytes(server.folder / "tmp") == archived


def malformed_bodies() -> list[tuple[bytes, str]]:
    """Over 200 bad requests: every field with wrong types and out-of-range values, and broken bodies."""
    bad_values = {
        "prompt": [None, "", "   ", 5, ["a"], {"a": 1}, "x" * 5000, True],
        "negative_prompt": [5, ["a"], "x" * 5000],
        "num_inference_steps": [0, -1, 151, 10**30, 2.5, "20", float("nan"), True, [1]],
        "guidance_scale": [-1, 31, float("nan"), float("inf"), -float("inf"), "7", [7], 10**400],
        "width": [770, 0, 63, -64, 1032, 10**12, 64.5, "512", float("inf")],
        "height": [770, 8, 2048, "x", [64], {"h": 1}],
        "seed": [-1, 2**63, 1.5, "seed", [1], float("nan")],
        "num_images": [0, 5, 100, -1, "2", 1.5],
        "scheduler": ["fast", 3, "", ["ddim"]],
        "output_format": ["gif", 1, "", ["png"]],
        "image": ["not base64!", "aGVsbG8=", 5, "data:image/png;base64,@@@"],
        "mask_image": ["aGVsbG8="],
        "strength": [0.5, 0, 2],
        "unknown": [1],
        "steps": [20],
    }
    bodies = []
    for name, values in bad_values.items():
        for value in values:
            body = {"prompt": "a cat", **SMALL, name: value}
            if name == "prompt" and value is None:
                del body["prompt"]
            bodies.append((json.dumps(body).encode(), "application/json"))
    bodies += [(b"", "text/plain"), (b"   ", "text/plain"), (b"\xff" * 10, "text/plain"), (b"{", "application/json"),
               (b"[1, 2]", "application/json"), (b"null", "application/json"), (b'"a cat"', "application/json"),
               (b"[" * 100000, "application/json"), (b"1" * 5000, "application/json"),
               (json.dumps({"prompt": "a cat", "width": 1024, "height": 1024, "num_images": 4}).encode(),
                "application/json"),
               (json.dumps({"prompt": "a cat", "output_format": "png", "num_images": 2, **SMALL}).encode(),
                "application/json")]
    bodies += [(bytes([byte]) * 3, "text/plain") for byte in range(0x80, 0xC0, 2)]
    bodies += [(json.dumps({"prompt": "a", **SMALL, "width": width, "height": height}).encode(), "application/json")
               for width, height in itertools.product([60, 4096], [100, 8000])]
    bodies += [(json.dumps({"prompt": "a", **SMALL, "guidance_scale": g}).encode(), "application/json")
               for g in (30.5, 100, 1e308, -0.1)]
    bodies += [(json.dumps({"prompt": "a", **SMALL, "num_inference_steps": steps}).encode(), "application/json")
               for steps in range(151, 171)]
    bodies += [(json.dumps({"prompt": "a", **SMALL, "width": width}).encode(), "application/json")
               for width in range(65, 128) if width % 8]
    return bodies


def test_hundreds_of_malformed_requests_each_get_a_4xx_and_no_worker_restarts(two_workers):
    pids = sorted(two_workers.worker_pids(MODEL))
    bodies = malformed_bodies()
    assert len(bodies) >= 200
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda body: post(two_workers, *body), bodies))
    statuses = [reply.status_code for reply in replies]
    unexpected = [(body[0][:80], status) for body, status in zip(bodies, statuses) if not 400 <= status < 500]
    assert not unexpected
    for reply in replies:
        error_of(reply)
    assert sorted(two_workers.worker_pids(MODEL)) == pids
    assert post(two_workers, json.dumps({"prompt": "a cat", **SMALL}).encode()).status_code == 200


def send_in_background(server, body: dict, outcomes: list) -> threading.Thread:
    """POST ``body`` from a thread; its status (or the name of the client error) goes to ``outcomes``."""
    def send():
        try:
            outcomes.append(predict(server, body, timeout=600).status_code)
        except requests.RequestException as error:
            outcomes.append(type(error).__name__)

    client = threading.Thread(target=send)
    client.start()
    return client


def test_a_killed_worker_fails_its_request_and_is_replaced(two_workers):
    pids = two_workers.worker_pids(MODEL)
    offset = log_offset(two_workers)
    outcomes = []
    client = send_in_background(two_workers, SLOW, outcomes)
    busy = int(wait_for_log(two_workers, GENERATING, offset).group(1))
    assert busy in pids
    os.kill(busy, signal.SIGKILL)
    client.join(timeout=120)
    assert not client.is_alive(), "the client hung after its worker was killed"
    assert len(outcomes) == 1 and isinstance(outcomes[0], int) and outcomes[0] >= 500, outcomes
    wait_for_workers(two_workers, 2)
    replaced = two_workers.worker_pids(MODEL)
    assert busy not in replaced and set(pids) - {busy} <= set(replaced)
    assert post(two_workers, json.dumps({"prompt": "a cat", **SMALL}).encode()).status_code == 200


def test_stop_with_requests_in_flight_leaves_no_process(faults_mar, tmp_path):
    server = start_server(tmp_path / "server", faults_mar, workers=2)  # its own: this test stops it
    outcomes, clients = [], []
    try:
        processes = server.processes()
        assert len(processes) >= 3  # the frontend and two workers
        offset = log_offset(server)
        clients = [send_in_background(server, SLOW, outcomes) for _ in range(3)]
        wait_for_log(server, GENERATING, offset)
    finally:
        server.stop()
    for client in clients:
        client.join(timeout=120)
    assert not any(client.is_alive() for client in clients), "a client hung after the server stopped"
    assert len(outcomes) == 3 and 200 not in outcomes, outcomes
    assert not [process for process in processes if process.is_running() and process.status() != "zombie"]
