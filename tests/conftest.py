"""Shared fixtures: the tiny pipeline, a handler driven in-process, and real TorchServes.

The only stand-in is TorchServe's own ``Context`` object built by hand (with real RequestProcessors and a
real metrics cache): that is how TorchServe's unit tests drive handlers without starting the server.
The functions these fixtures use live in helpers.py; ``make_context``, ``set_requests``, ``REPO_ROOT`` and
``run_build_mar`` stay importable from here.
"""

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import (  # noqa: E402  (HF_HUB_OFFLINE must be set before anything imports huggingface_hub)
    MODEL, REPO_ROOT, build_tiny_mar, make_context, run_build_mar, set_requests, start_server, stop_server,
)

__all__ = ["REPO_ROOT", "make_context", "run_build_mar", "set_requests"]


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    from builder.tiny_pipeline import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny") / "pipeline"
    build_tiny_pipeline(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_pipeline_dir):
    from handler.model.device import Placement
    from handler.model.loading import load_pipeline
    import torch

    return load_pipeline(tiny_pipeline_dir, Placement("cpu", torch.float32))


@pytest.fixture(scope="session")
def handler_factory(tiny_pipeline_dir, tmp_path_factory):
    """Make an initialised handler whose model dir holds the tiny pipeline under pipeline/, as TorchServe
    extracts a built .mar."""
    from handler.stable_diffusion_handler import StableDiffusionHandler

    def make(handler_settings: dict | None = None):
        model_dir = tmp_path_factory.mktemp("model_dir")
        shutil.copytree(tiny_pipeline_dir, model_dir / "pipeline")
        handler = StableDiffusionHandler()
        context = make_context(model_dir, {"warmup": False, **(handler_settings or {})})
        handler.initialize(context)
        return handler, context

    return make


@pytest.fixture(scope="session")
def tiny_mar(tmp_path_factory) -> Path:
    """model_store/stable_diffusion.mar built by build_mar.sh --tiny, in a temporary export path."""
    work = tmp_path_factory.mktemp("build")
    store = work / "model_store"
    run_build_mar("--tiny", "--export-path", store, "--work-dir", work / "scratch")
    return store / f"{MODEL}.mar"


@pytest.fixture(scope="session")
def torchserve(tiny_mar, tmp_path_factory):
    """A real TorchServe on loopback serving the tiny .mar with the shipped configs, token authorization on;
    stopped at the end. Tests that change it (scaling) must put it back as they found it."""
    server = start_server(tmp_path_factory.mktemp("torchserve"), tiny_mar)
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="session")
def batched_server(tmp_path_factory):
    """A real TorchServe with dynamic batching: batchSize 4, maxBatchDelay 1000 ms, one worker (so every
    batch TorchServe forms reaches the same handler). Shared by the batching and explanation tests."""
    work = tmp_path_factory.mktemp("batched")
    mar = build_tiny_mar(work, {"batchSize": 4, "maxBatchDelay": 1000, "minWorkers": 1, "maxWorkers": 1},
                         {"warmup": False})
    server = start_server(work / "server", mar)
    try:
        yield server
    finally:
        stop_server(server)
