"""The GPU paths' defects, reproduced on CPU: float16 runs on CPU for the tiny pipelines, and torch.compile's
guards and recompiles are the same on every device (counted with a backend that counts its calls).

Where a test stands in for a GPU-only event (an out-of-memory error, a CUDA graph overwriting its output,
torch.cuda.set_device), it says so and why the stand-in behaves like the real thing.
"""

import json
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from torch._dynamo import register_backend

from conftest import REPO_ROOT
from handler.protocols.http import status_of
from handler.core.contract import GenerationRequest
from handler.core.failures import INVALID_FIELD, OUT_OF_MEMORY
from handler.core.generation import GenerationEngine
from handler.core.settings import HandlerSettings, SettingsError
from handler.model import device
from handler.model.device import Placement
from handler.model.loading import load_pipeline
from handler.model.optimizations import compiled_graphs, warmup_buckets

CPU = Placement("cpu", torch.float32)
COMPILES = []


@register_backend(name="counting_test")
def counting_backend(graph, example_inputs):
    """Runs the captured graph as it is and counts the compiles (each guard failure makes one more)."""
    COMPILES.append(graph)
    return graph.forward


@register_backend(name="static_outputs_test")
def static_outputs_backend(graph, example_inputs):
    """Returns every output in the same buffers on every call, as a replayed CUDA graph does: the tensors a
    caller kept from the previous call change under it."""
    buffers = []

    def run(*args):
        outputs = graph(*args)
        if not buffers:
            buffers.extend(output.clone() for output in outputs)
        for buffer, output in zip(buffers, outputs):
            buffer.copy_(output)
        return type(outputs)(buffers)

    return run


def request(width=64, height=64, images=1, scheduler=None, guidance=7.5, steps=2) -> GenerationRequest:
    return GenerationRequest(prompt="a cat", negative_prompt=None, num_inference_steps=steps,
                             guidance_scale=guidance, width=width, height=height, seeds=tuple(range(3, 3 + images)),
                             scheduler=scheduler)


def generate(engine, *requests):
    with torch.inference_mode():
        return engine.generate(list(requests))


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from builder.tiny_pipeline import build_tiny_pipeline

    root = tmp_path_factory.mktemp("families")
    for family in ("sdxl", "sd3", "flux"):
        build_tiny_pipeline(root / family, family)
    return root


# --- 1: SDXL's VAE after an out-of-memory error in its float32 decode -----------------------------------------


def test_sdxl_in_float16_survives_an_out_of_memory_error_in_the_upcast_decode(family_dirs):
    # float16 on CPU: choose_placement refuses it for serving (slow), but the tiny SDXL runs, and diffusers
    # upcasts its VAE exactly as on CUDA. The decode raises the error the CUDA allocator raises when it fails
    # (no allocation can be made to fail on CPU without exhausting the machine).
    pipeline = load_pipeline(family_dirs / "sdxl", Placement("cpu", torch.float16))
    assert pipeline.vae.config.force_upcast and pipeline.vae.dtype == torch.float16
    engine = GenerationEngine(pipeline, 10**7)
    decode = pipeline.vae.decode

    def out_of_memory(*args, **kwargs):
        assert pipeline.vae.dtype == torch.float32  # the upcast happened: the failure is in between
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    pipeline.vae.decode = out_of_memory
    assert generate(engine, request())[0].reason == OUT_OF_MEMORY
    pipeline.vae.decode = decode
    assert pipeline.vae.dtype == torch.float16
    assert generate(engine, request())[0].images.shape == (1, 64, 64, 3)


# --- 4: out-of-memory recovery frees what the failed call held -------------------------------------------------


def failing_unet(pipeline, error_type: type, message: str, held: list):
    """Make the UNet allocate an activation, keep it in its frame, and raise a new ``error_type(message)``
    (a new one each time: an exception kept outside would keep its traceback alive)."""
    def forward(*args, **kwargs):
        activations = torch.ones(256, 256)
        held.append(weakref.ref(activations))
        raise error_type(message)
    pipeline.unet.forward = forward


def test_out_of_memory_recovery_runs_once_the_failed_call_is_released(tiny_pipeline_dir):
    pipeline = load_pipeline(tiny_pipeline_dir, CPU)
    engine = GenerationEngine(pipeline, 10**7)
    held, alive_when_freeing = [], []
    free_memory = engine._free_memory

    def recording_free_memory():
        free_memory()
        alive_when_freeing.append(held[0]() is not None)

    engine._free_memory = recording_free_memory
    failing_unet(pipeline, torch.OutOfMemoryError, "CUDA out of memory", held)
    assert generate(engine, request())[0].reason == OUT_OF_MEMORY
    assert alive_when_freeing == [False]  # the traceback's frames (and their tensors) were gone


@pytest.mark.parametrize("message", [
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "CUDA error: out of memory",
])
def test_cudnn_and_cublas_allocation_failures_answer_507(tiny_pipeline, message):
    # These RuntimeErrors come from the CUDA libraries when a full GPU leaves them no workspace; raised here
    # from the UNet since no CPU run can produce them.
    from handler.core.generation import GenerationEngine as Engine

    engine = Engine(tiny_pipeline, 10**7)
    unet_forward = tiny_pipeline.unet.forward
    try:
        failing_unet(tiny_pipeline, RuntimeError, message, [])
        outcome = generate(engine, request())[0]
    finally:
        tiny_pipeline.unet.forward = unet_forward
    assert outcome.reason == OUT_OF_MEMORY and status_of(outcome) == 507


# --- 5: attention slicing where there is none ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_attention_slicing_is_refused_on_transformer_families(family_dirs, family):
    with pytest.raises(SettingsError, match="attention: slicing is not available"):
        load_pipeline(family_dirs / family, CPU, HandlerSettings(attention="slicing"))


# --- 6: the worker's GPU is the current device -----------------------------------------------------------------


def test_select_device_makes_the_worker_gpu_current(monkeypatch):
    # torch.cuda.set_device needs a GPU; recording its argument shows which GPU a worker would make current.
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    device.select_device(Placement("cuda:3", torch.float16))
    device.select_device(CPU)
    assert chosen == [torch.device("cuda:3")]


# --- 2: torch.compile compiles at warm-up, and not again ----------------------------------------------------


BUCKETS = ["64x64", "64x64x2", "96x64"]


def test_compiled_unet_does_not_recompile_after_warm_up(tiny_pipeline_dir):
    settings = HandlerSettings.from_mapping({"torch_compile": True, "compile_backend": "counting_test",
                                             "compile_warmup_sizes": BUCKETS})
    engine = GenerationEngine(load_pipeline(tiny_pipeline_dir, CPU, settings), 10**7)
    before = compiled_graphs()
    engine.warm_up(warmup_buckets(settings))
    warmed, counted = compiled_graphs(), len(COMPILES)
    assert warmed > before
    for outcome in generate(engine, request(), request(images=2), request(width=96), request(scheduler="euler"),
                            request(scheduler="ddim", images=2), request(width=64, height=96)):
        assert outcome.images.shape[0] >= 1
    assert (compiled_graphs(), len(COMPILES)) == (warmed, counted)


def test_compiling_fixes_the_thread_count(handler_factory):
    handler, _ = handler_factory({"torch_compile": True, "compile_backend": "counting_test"})
    threads = torch.get_num_threads()
    handler.registry.register(os.getppid())  # a second live worker would halve an unfixed share
    handler._set_thread_count()
    assert torch.get_num_threads() == threads


# --- 3: CUDA graphs: outputs copied out, shapes bounded ----------------------------------------------------------


def test_reduce_overhead_keeps_pndm_outputs_from_being_overwritten(tiny_pipeline_dir):
    eager = GenerationEngine(load_pipeline(tiny_pipeline_dir, CPU), 10**7)
    settings = HandlerSettings.from_mapping({"torch_compile": True, "compile_mode": "reduce-overhead",
                                             "compile_backend": "static_outputs_test",
                                             "compile_warmup_sizes": ["64x64"]})
    graphed = GenerationEngine(load_pipeline(tiny_pipeline_dir, CPU, settings), 10**7)
    # guidance 1: no guidance step, so PNDM keeps the UNet's own output tensors across its 4-step history
    pndm = request(scheduler="pndm", guidance=1.0, steps=6)
    expected = generate(eager, pndm)[0].images.astype(int)
    assert np.abs(generate(graphed, pndm)[0].images.astype(int) - expected).max() <= 1


def test_reduce_overhead_needs_the_shapes_listed():
    with pytest.raises(SettingsError, match="compile_warmup_sizes"):
        HandlerSettings.from_mapping({"torch_compile": True, "compile_mode": "reduce-overhead"})


def test_calls_are_bounded_to_the_recorded_shapes(tiny_pipeline):
    engine = GenerationEngine(tiny_pipeline, 10**7, call_shapes=frozenset({(64, 64, 1)}))
    warmed, other = generate(engine, request(steps=1), request(width=96, steps=1))
    assert warmed.images.shape == (1, 64, 64, 3)
    assert other.reason == INVALID_FIELD and other.field == "width" and "64x64 with 1 image(s)" in other.message


# --- presets ----------------------------------------------------------------------------------------------------


def images_of(pipeline) -> np.ndarray:
    return generate(GenerationEngine(pipeline, 10**7), request(images=2))[0].images.astype(int)


def test_fused_qkv_and_int8_weights_keep_the_images(tiny_pipeline_dir, tiny_pipeline):
    from torchao.quantization import Int8Tensor

    plain = images_of(tiny_pipeline)
    fused = load_pipeline(tiny_pipeline_dir, CPU, HandlerSettings(fuse_qkv=True))
    assert all(module.fused_projections for module in fused.unet.modules() if hasattr(module, "fused_projections"))
    assert np.abs(images_of(fused) - plain).max() <= 2
    quantized = load_pipeline(tiny_pipeline_dir, CPU, HandlerSettings(quantization="int8wo"))
    assert isinstance(quantized.unet.time_embedding.linear_1.weight, Int8Tensor)
    assert np.abs(images_of(quantized) - plain).max() <= 8  # int8 weights: close, not equal


def test_step_cache_runs_on_flux_and_is_refused_elsewhere(family_dirs, tiny_pipeline_dir):
    cached = load_pipeline(family_dirs / "flux", CPU, HandlerSettings(step_cache_threshold=0.1))
    assert images_of(cached).shape == (2, 64, 64, 3)
    for folder in (family_dirs / "sd3", tiny_pipeline_dir):
        with pytest.raises(SettingsError, match="step_cache_threshold is available for FluxPipeline only"):
            load_pipeline(folder, CPU, HandlerSettings(step_cache_threshold=0.1))


def test_presets_that_cannot_apply_fail_the_load_with_the_reason(tiny_pipeline_dir, monkeypatch):
    with pytest.raises(SettingsError, match="tf32 needs CUDA"):
        load_pipeline(tiny_pipeline_dir, CPU, HandlerSettings(tf32=True))
    with pytest.raises(SettingsError, match="quantization: fp8 needs a CUDA GPU"):
        load_pipeline(tiny_pipeline_dir, CPU, HandlerSettings(quantization="fp8"))
    with pytest.raises(SettingsError, match="not a torch.compile backend"):
        load_pipeline(tiny_pipeline_dir, CPU, HandlerSettings(torch_compile=True, compile_backend="nonesuch"))
    # The optional packages made absent: a None entry in sys.modules makes their import fail as if missing.
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    monkeypatch.setitem(sys.modules, "openvino.torch", None)
    with pytest.raises(SettingsError, match="needs the torchao package"):
        load_pipeline(tiny_pipeline_dir, CPU, HandlerSettings(quantization="int8wo"))
    with pytest.raises(SettingsError, match="needs the openvino package"):
        load_pipeline(tiny_pipeline_dir, CPU, HandlerSettings(torch_compile=True, compile_backend="openvino"))


def test_gpu_check_dry_run_reports_every_check(tmp_path):
    output = tmp_path / "gpu_check.json"
    completed = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--families", "sdxl", "flux",
                                "--output", str(output)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = {(row["group"], row["metric"]): row["value"] for row in json.loads(output.read_text())["rows"]}
    assert not [key for key in rows if "failed" in key[1]]
    for family in ("sdxl", "flux"):
        assert rows[(family, "compile: compiles after warm-up")] == 0
        assert rows[(family, "eager: largest pixel difference vs CPU float32")] == 0
    assert rows[("flux", "step cache 0.1: compiles after warm-up")] == 0
    assert [rows[("sdxl OOM", metric)] for metric in ("first request answered out_of_memory", "next request succeeded",
                                                      "VAE back in float16")] == [1, 1, 1]
    assert "| sdxl OOM |" in completed.stdout
