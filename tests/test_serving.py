"""A real TorchServe on loopback serving a .mar built by build_mar.sh --tiny, with token authorization on."""

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from helpers import (
    MODEL, SMALL, error_of, log_offset, log_since, npy, png_base64, predict, run_build_mar, scale, running_server,
    metric_values, wait_for_metrics,
)

pytestmark = pytest.mark.serving


def test_requests_without_the_token_are_rejected(torchserve):
    response = requests.post(f"{torchserve.inference_url}/predictions/stable_diffusion", data=b"a cat",
                             headers={"Content-Type": "text/plain"}, timeout=30)
    assert response.status_code in (400, 401)
    assert requests.get(f"{torchserve.management_url}/models", timeout=30).status_code in (400, 401)


def test_upstream_client_gets_a_768_image_at_the_defaults(torchserve):
    # The body and client line of TorchServe's examples/diffusers, unchanged: text/plain prompt, 768x768, 50 steps.
    r = predict(torchserve, data="a photo of an astronaut riding a horse on mars".encode(),
                headers={"Content-Type": "text/plain"})
    assert r.status_code == 200, r.text[:300]
    assert r.headers["Content-Type"].startswith("application/json")
    image = Image.fromarray(np.array(json.loads(r.text), dtype="uint8"))
    assert image.size == (768, 768) and image.mode == "RGB"
    assert re.fullmatch(r"\d+", r.headers["X-Seeds"])


def test_json_and_form_bodies_work(torchserve):
    from_json = predict(torchserve, {"prompt": "a cat", "seed": 5, **SMALL})
    from_form = predict(torchserve, data={"prompt": "a cat", "seed": "5", **{k: str(v) for k, v in SMALL.items()}})
    assert from_json.status_code == 200 and from_form.status_code == 200, (from_json.text[:200], from_form.text[:200])
    assert from_json.headers["X-Seeds"] == from_form.headers["X-Seeds"] == "5"
    assert np.array_equal(np.array(from_json.json(), dtype="uint8"), np.array(from_form.json(), dtype="uint8"))


def test_accept_png_returns_a_png_with_its_parameters(torchserve):
    r = predict(torchserve, {"prompt": "a lighthouse", "seed": 3, **SMALL}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
    image = Image.open(io.BytesIO(r.content))
    assert image.format == "PNG" and image.size == (64, 64)
    assert json.loads(image.text["generation"])["seed"] == 3


@pytest.mark.parametrize("body, headers, expected", [
    (b"", {"Content-Type": "text/plain"}, "prompt"),
    (b"\xff\xfe\xfd", {"Content-Type": "text/plain"}, "UTF-8"),
    (json.dumps({"steps": 3}).encode(), {"Content-Type": "application/json"}, "unknown field"),
    (json.dumps({"negative_prompt": "x"}).encode(), {"Content-Type": "application/json"}, "prompt is required"),
    (b"{not json", {"Content-Type": "application/json"}, "not valid JSON"),
])
def test_bad_bodies_get_a_4xx_and_the_worker_keeps_serving(torchserve, body, headers, expected):
    pids_before = torchserve.worker_pids(MODEL)
    r = predict(torchserve, data=body, headers=headers)
    assert 400 <= r.status_code < 500
    assert expected in error_of(r)["message"]
    ok = predict(torchserve, {"prompt": "a cat", **SMALL})
    assert ok.status_code == 200
    assert torchserve.worker_pids(MODEL) == pids_before


def test_scaling_to_two_workers_gives_two_serving_workers(torchserve):
    before = torchserve.describe(MODEL)
    offset = log_offset(torchserve)
    scale(torchserve, 2, 2)
    try:
        assert torchserve.ready_workers(MODEL) == 2
        pids = set(torchserve.worker_pids(MODEL))
        served_by = set()
        with ThreadPoolExecutor(4) as pool:
            for _ in range(5):  # TorchServe picks the worker: send rounds until both have generated
                replies = list(pool.map(lambda seed: predict(torchserve, {"prompt": "a cat", "seed": seed, **SMALL}),
                                        range(4)))
                assert all(reply.status_code == 200 for reply in replies)
                served_by = pids_that_generated(log_since(torchserve, offset))
                if served_by == pids:
                    break
        assert served_by == pids, (served_by, pids)
    finally:  # the session's server goes back to the shipped worker range, one worker
        scale(torchserve, before["minWorkers"], before["minWorkers"])
        scale(torchserve, before["minWorkers"], before["maxWorkers"])
    after = torchserve.describe(MODEL)
    assert (after["minWorkers"], after["maxWorkers"]) == (before["minWorkers"], before["maxWorkers"])
    assert torchserve.ready_workers(MODEL) == len(before["workers"])


def pids_that_generated(log: str) -> set[int]:
    return {int(pid) for pid in re.findall(r"worker (\d+) generated [1-9]\d* image", log)}


def test_no_archive_build_from_a_model_dir_serves_the_same_image(torchserve, tiny_mar, tmp_path):
    source = tiny_mar.parent.parent / "scratch" / "tiny-sd1"
    store = tmp_path / "store"
    run_build_mar("--model-dir", source, "--archive-format", "no-archive", "--export-path", store,
                  "--work-dir", tmp_path / "scratch")
    folder = store / MODEL
    weights = folder / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    assert (folder / "MAR-INF" / "MANIFEST.json").is_file()
    assert weights.stat().st_mode & 0o777 == 0o644
    with running_server(tmp_path / "server", folder) as server:
        body = {"prompt": "a cat", "seed": 21, **SMALL}
        from_folder = predict(server, body)
        from_mar = predict(torchserve, body)
        assert from_folder.status_code == from_mar.status_code == 200
        assert np.array_equal(np.array(from_folder.json()), np.array(from_mar.json()))


def test_the_client_saves_images_and_prints_seeds(torchserve, tmp_path, capsys):
    from sdclient.client import main

    token_file = torchserve.folder / "key_file.json"
    code = main(["a red fox", "-o", str(tmp_path / "fox.png"), "--seed", "7", "--steps", "2", "--width", "64",
                 "--height", "64", "--num-images", "2", "--url", torchserve.inference_url, "--token-file",
                 str(token_file)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "fox-0.png  seed=7" in printed and "fox-1.png  seed=8" in printed
    saved = Image.open(tmp_path / "fox-1.png")
    assert saved.size == (64, 64) and json.loads(saved.text["generation"])["seed"] == 8
    assert main(["a fox", "--width", "65", "--url", torchserve.inference_url, "--token-file", str(token_file)]) == 1
    assert "width must be a multiple of 8" in capsys.readouterr().err


def test_image_to_image_and_inpainting_through_the_server(torchserve):
    import base64

    source = np.full((72, 80, 3), 180, dtype=np.uint8)
    mask = np.zeros((72, 80), dtype=np.uint8)
    mask[20:50, 20:60] = 255
    edited = predict(torchserve, {"prompt": "a cat", "image": png_base64(source, data_url=True), "strength": 0.5,
                                  "num_inference_steps": 4, "output_format": "npy"})
    inpainted = predict(torchserve, {"prompt": "a cat", "image": png_base64(source, data_url=True),
                                     "mask_image": png_base64(mask, data_url=True), "num_inference_steps": 4,
                                     "output_format": "npy"})
    assert npy(edited).shape == (72, 80, 3)
    assert npy(inpainted).shape == (72, 80, 3)
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    refused = predict(torchserve, {"prompt": "a cat", "image": base64.b64encode(bomb.getvalue()).decode()})
    assert refused.status_code == 413 and "pixels" in error_of(refused)["message"]


def test_inpainting_and_outpainting_keep_the_sent_pixels_outside_the_mask(torchserve):
    source = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    inpainted = npy(predict(torchserve, {"prompt": "a cat", "image": png_base64(source), "mask_image": png_base64(mask),
                                         "num_inference_steps": 2, "seed": 1, "output_format": "npy"}))
    assert np.array_equal(inpainted[:, :32], source[:, :32])
    assert not np.array_equal(inpainted[:, 32:], source[:, 32:])
    outpainted = npy(predict(torchserve, {"prompt": "a cat", "image": png_base64(source),
                                          "outpaint": {"left": 8, "right": 8, "top": 8}, "num_inference_steps": 2,
                                          "seed": 1, "output_format": "npy"}))
    assert outpainted.shape == (72, 80, 3)
    assert np.array_equal(outpainted[8:, 8:72], source)


def test_custom_metrics_reach_prometheus(torchserve):
    """Counted as deltas: the server is shared by the whole run, so totals would count other tests' requests."""
    counted = (("GeneratedImages", 'ModelName="stable_diffusion"'), ("GeneratedPixelSteps",), ("PipelineSeconds_count",),
               ("EncodeSeconds_count",), ("RejectedRequests", 'Reason="invalid_field"'))
    before = metric_values(torchserve, counted)
    assert predict(torchserve, {"prompt": "a cat", **SMALL}).status_code == 200
    assert predict(torchserve, {"prompt": "a cat", "width": 65}).status_code == 400
    after = wait_for_metrics(torchserve, counted, lambda values: all(v > b for b, v in zip(before, values)))
    assert [later - earlier for earlier, later in zip(before, after)] == [1, 64 * 64 * 2, 1, 1, 1]
