"""Dynamic batching through a real TorchServe: batchSize 4, concurrent clients, mixed requests."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import yaml

from conftest import REPO_ROOT, run_build_mar
from harness.local_server import LocalTorchServe

pytestmark = pytest.mark.serving

SMALL = {"num_inference_steps": 3, "width": 64, "height": 64, "output_format": "json"}


@pytest.fixture(scope="module")
def batched_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("batched")
    config = yaml.safe_load((REPO_ROOT / "model-config.yaml").read_text())
    config.update(batchSize=4, maxBatchDelay=1000, minWorkers=1, maxWorkers=1)
    (work / "model-config.yaml").write_text(yaml.safe_dump(config))
    run_build_mar("--tiny", "--config-file", work / "model-config.yaml", "--export-path", work / "store",
                  "--work-dir", work / "scratch")
    server = LocalTorchServe(work / "server", work / "store", {"stable_diffusion": "stable_diffusion.mar"})
    server.start()
    yield server
    server.stop()
    assert not server.processes()


def post(server, body):
    # json.dumps writes NaN as the bare token NaN, which Python's JSON parser (TorchServe's) accepts.
    return requests.post(f"{server.inference_url}/predictions/stable_diffusion", data=json.dumps(body),
                         headers={**server.inference_headers(), "Content-Type": "application/json"}, timeout=300)


def test_concurrent_requests_are_grouped_and_answered_each_on_its_own(batched_server):
    bodies = [
        {"prompt": "a cat", "seed": 1, **SMALL},
        {"prompt": "a dog", "seed": 2, **SMALL},
        {"prompt": "a cat", "seed": 3, **{**SMALL, "width": 72}},  # incompatible size: its own call
        {"prompt": "a cat", "seed": 4, **{**SMALL, "guidance_scale": float("nan")}},  # invalid
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda body: post(batched_server, body), bodies))
    assert [reply.status_code for reply in replies] == [200, 200, 200, 400]
    assert "guidance_scale" in replies[3].json()["error"]["message"]
    results = [reply.json() for reply in replies[:3]]
    assert [result["seeds"] for result in results] == [[1], [2], [3]]
    # The two compatible requests shared one pipeline call; the 72-wide one ran alone.
    assert [result["timings_ms"]["batch_images"] for result in results] == [2, 2, 1]
    alone = post(batched_server, bodies[1]).json()
    assert alone["timings_ms"]["batch_images"] == 1
    assert np.abs(decode(alone).astype(int) - decode(results[1]).astype(int)).max() <= 2


def decode(result) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    return np.array(Image.open(io.BytesIO(base64.b64decode(result["images"][0]))))
