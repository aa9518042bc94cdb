"""Dynamic batching through a real TorchServe: batchSize 4, concurrent clients, mixed requests.

TorchServe decides which requests share a handler call (by arrival within maxBatchDelay), so these tests
hold whatever batches it forms: every answer is checked on its own, a pipeline call never holds more than the
requests that may share it, and grouping is shown by retrying a few rounds until it happens.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from helpers import error_of, json_images, predict

pytestmark = pytest.mark.serving

BASE = {"num_inference_steps": 3, "width": 64, "height": 64, "output_format": "json"}
MIXED = [
    {"prompt": "a cat", "seed": 1, **BASE},
    {"prompt": "a dog", "seed": 2, **BASE},
    {"prompt": "a cat", "seed": 3, **{**BASE, "width": 72}},  # another size: never in the others' pipeline call
    # json.dumps writes NaN as a bare token; the handler reads it and must refuse it on its own.
    {"prompt": "a cat", "seed": 4, **{**BASE, "guidance_scale": float("nan")}},
]
COMPATIBLE = (0, 1)  # the only requests of MIXED that may share a pipeline call
MAX_ROUNDS = 6


def send_together(server, bodies):
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: predict(server, body), bodies))


def check_each_answer(replies) -> list[dict]:
    """Every reply is right for its own request, whatever batch it was in; returns the 200s' bodies."""
    assert [reply.status_code for reply in replies] == [200, 200, 200, 400], [r.text[:200] for r in replies]
    error = error_of(replies[3])
    assert error["field"] == "guidance_scale" and "guidance_scale" in error["message"]
    results = [reply.json() for reply in replies[:3]]
    for body, result in zip(MIXED, results):
        assert result["seeds"] == [body["seed"]]
        assert result["parameters"]["prompt"] == body["prompt"]
        (image,) = json_images(result)
        assert image.shape == (body["height"], body["width"], 3)
    grouped = [results[index]["timings_ms"]["batch_images"] for index in COMPATIBLE]
    assert all(count in (1, len(COMPATIBLE)) for count in grouped), grouped
    assert grouped[0] == grouped[1], "two requests disagree on whether they shared a call"
    assert results[2]["timings_ms"]["batch_images"] == 1  # nothing else has its size
    return results


def test_concurrent_requests_are_answered_each_on_its_own_and_compatible_ones_grouped(batched_server):
    grouped = None
    for _ in range(MAX_ROUNDS):
        results = check_each_answer(send_together(batched_server, MIXED))
        # batch_images counts the images of the request's pipeline call: two requests' images in one call exist
        # only where TorchServe handed both to one handler call, so the answers themselves show the batch.
        if results[COMPATIBLE[0]]["timings_ms"]["batch_images"] == len(COMPATIBLE):
            grouped = results
            break
    assert grouped is not None, f"compatible requests never shared a pipeline call in {MAX_ROUNDS} rounds"

    # The same seed gives the same image alone as it gave inside the shared call.
    alone = predict(batched_server, MIXED[1])
    assert alone.status_code == 200, alone.text[:200]
    assert alone.json()["timings_ms"]["batch_images"] == 1
    difference = json_images(alone.json())[0].astype(int) - json_images(grouped[1])[0].astype(int)
    assert np.abs(difference).max() <= 2
