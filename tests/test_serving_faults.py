"""Faults and hostile input against a real TorchServe with two workers sharing one model directory."""

import itertools
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

from conftest import REPO_ROOT, run_build_mar
from harness.local_server import LocalTorchServe

pytestmark = pytest.mark.serving

SMALL = {"num_inference_steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    config = yaml.safe_load((REPO_ROOT / "model-config.yaml").read_text())
    config.update(minWorkers=2, maxWorkers=2)
    (work / "model-config.yaml").write_text(yaml.safe_dump(config))
    run_build_mar("--tiny", "--config-file", work / "model-config.yaml", "--export-path", work / "store",
                  "--work-dir", work / "scratch")
    server = LocalTorchServe(work / "server", work / "store", {"stable_diffusion": "stable_diffusion.mar"})
    server.start()
    wait_for_workers(server, 2)
    yield server
    server.stop()
    assert not server.processes()


def wait_for_workers(server, count, timeout=120):
    deadline = time.monotonic() + timeout
    while server.ready_workers("stable_diffusion") < count:
        assert time.monotonic() < deadline, f"fewer than {count} READY workers after {timeout} s"
        time.sleep(0.5)


def post(server, data, content_type="application/json", timeout=120):
    return requests.post(f"{server.inference_url}/predictions/stable_diffusion", data=data, timeout=timeout,
                         headers={**server.inference_headers(), "Content-Type": content_type})


def model_log(server) -> str:
    return (server.folder / "logs" / "model_log.log").read_text()


def test_two_workers_starting_together_unpack_the_zip_once(two_workers):
    log = model_log(two_workers)
    assert log.count("unpacked pipeline.zip into") == 1
    assert log.count("unpacked by another worker") == 1


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
    pids = sorted(two_workers.worker_pids("stable_diffusion"))
    bodies = malformed_bodies()
    assert len(bodies) >= 200
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda body: post(two_workers, *body), bodies))
    statuses = [reply.status_code for reply in replies]
    unexpected = [(body[0][:80], status) for body, status in zip(bodies, statuses) if not 400 <= status < 500]
    assert not unexpected
    assert all(reply.json()["error"]["message"] for reply in replies)
    assert sorted(two_workers.worker_pids("stable_diffusion")) == pids
    assert post(two_workers, json.dumps({"prompt": "a cat", **SMALL})).status_code == 200


def test_a_killed_worker_fails_its_request_and_is_replaced(two_workers):
    pids = two_workers.worker_pids("stable_diffusion")
    # 768x768 at 50 steps takes about 20 s here: still running when the workers are killed 3 s in.
    body = json.dumps({"prompt": "a slow cat", "num_inference_steps": 50, "width": 768, "height": 768})
    replies = []
    client = threading.Thread(target=lambda: replies.append(post(two_workers, body, timeout=120)))
    client.start()
    time.sleep(3)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    client.join(timeout=120)
    assert not client.is_alive(), "the client hung after its worker was killed"
    assert replies and replies[0].status_code >= 500
    wait_for_workers(two_workers, 2)
    assert set(two_workers.worker_pids("stable_diffusion")).isdisjoint(pids)
    assert post(two_workers, json.dumps({"prompt": "a cat", **SMALL})).status_code == 200


def test_stop_with_requests_in_flight_leaves_no_process(two_workers):
    processes = two_workers.processes()
    body = json.dumps({"prompt": "a busy cat", "num_inference_steps": 40, "width": 512, "height": 512})
    outcomes = []

    def send():
        try:
            outcomes.append(post(two_workers, body, timeout=120).status_code)
        except requests.RequestException as error:
            outcomes.append(type(error).__name__)

    clients = [threading.Thread(target=send) for _ in range(3)]
    for client in clients:
        client.start()
    time.sleep(2)
    two_workers.stop()
    for client in clients:
        client.join(timeout=120)
    assert not any(client.is_alive() for client in clients), "a client hung after the server stopped"
    assert len(outcomes) == 3
    assert not [process for process in processes if process.is_running() and process.status() != "zombie"]
