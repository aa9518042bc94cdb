"""Shared fixtures: the tiny pipeline, a handler driven in-process, and a real TorchServe.

The only stand-in is TorchServe's own ``Context`` object built by hand (with real RequestProcessors and a
real metrics cache): that is how TorchServe's unit tests drive handlers without starting the server.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent


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


def make_context(model_dir: Path, handler_settings: dict | None = None, batch_size: int = 1):
    """A TorchServe Context as the worker builds it, for a model unpacked in ``model_dir``."""
    import ts
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    return Context("stable_diffusion", str(model_dir), None, batch_size, None, "0.12.0", metrics=metrics,
                   model_yaml_config={"handler": handler_settings or {}})


def set_requests(context, headers: list[dict]):
    """Attach one RequestProcessor per request, as the worker does before calling handle()."""
    from ts.context import RequestProcessor

    context.request_processor = [RequestProcessor(dict(header)) for header in headers]
    context.request_ids = {index: f"request-{index}" for index in range(len(headers))}


@pytest.fixture(scope="session")
def handler_factory(tiny_pipeline_dir, tmp_path_factory):
    """Make an initialised handler whose model dir holds the tiny pipeline zipped, as in a built .mar."""
    from builder.build_mar import zip_pipeline
    from handler.stable_diffusion_handler import StableDiffusionHandler

    archive = tmp_path_factory.mktemp("archive") / "pipeline.zip"
    zip_pipeline(tiny_pipeline_dir, archive)

    def make(handler_settings: dict | None = None):
        model_dir = tmp_path_factory.mktemp("model_dir")
        shutil.copy(archive, model_dir / "pipeline.zip")
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
    return store / "stable_diffusion.mar"


def run_build_mar(*arguments) -> None:
    """Run build_mar.sh as a user would, with the Python running the tests."""
    subprocess.run([str(REPO_ROOT / "build_mar.sh"), *map(str, arguments)], check=True,
                   env={**os.environ, "PYTHON": sys.executable})


@pytest.fixture(scope="session")
def torchserve(tiny_mar, tmp_path_factory):
    """A real TorchServe on loopback serving the tiny .mar, token authorization on; stopped at the end."""
    from harness.local_server import LocalTorchServe

    server = LocalTorchServe(tmp_path_factory.mktemp("torchserve"), tiny_mar.parent,
                             {"stable_diffusion": tiny_mar.name})
    server.start()
    try:
        yield server
    finally:
        processes = server.processes()
        server.stop()
        assert not [process for process in processes if process.is_running() and process.status() != "zombie"], \
            "TorchServe left processes running after stop"
