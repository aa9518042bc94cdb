"""Where and how the pipeline runs: the device and dtype, the speed steps, the torch threads per worker.

The decisions (``choose_placement``, ``plan_optimizations``, ``threads_per_worker``) are pure functions of the
settings and what the machine has, so CPU tests cover the GPU cases too. Two parts act on the process:
``select_device`` makes the worker's GPU current, and ``WorkerRegistry`` writes a pid file per worker in the
model folder to count the live workers.
"""

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from handler.core.settings import HandlerSettings


@dataclass(frozen=True)
class Placement:
    """The device and dtype a worker loads its pipeline with."""

    device: str
    dtype: torch.dtype


# Families trained in bfloat16, whose activations overflow float16.
BFLOAT16_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")


def choose_placement(settings: HandlerSettings, cuda_available: bool, gpu_id: Optional[int],
                     pipeline_class: str = "StableDiffusionPipeline") -> Placement:
    """CUDA (the GPU TorchServe assigned this worker) in float16 (bfloat16 for SD3 and Flux) when present;
    else CPU in float32.

    ``device: cuda`` on a machine without CUDA is an error rather than a silent CPU fallback: a GPU
    deployment that would run 100x slower should fail its model load, visibly.
    """
    if settings.device == "cuda" and not cuda_available:
        raise RuntimeError("model-config.yaml sets device: cuda but CUDA is not available to this worker")
    use_cuda = cuda_available and settings.device != "cpu"
    device = f"cuda:{gpu_id if gpu_id is not None else 0}" if use_cuda else "cpu"
    if settings.dtype == "auto" and use_cuda:
        dtype = torch.bfloat16 if pipeline_class in BFLOAT16_PIPELINES else torch.float16
    elif settings.dtype == "auto":
        dtype = torch.float32
    else:
        dtype = getattr(torch, settings.dtype)
    if not use_cuda and dtype == torch.float16:
        raise RuntimeError("dtype float16 needs CUDA; on CPU use float32 or bfloat16")
    return Placement(device=device, dtype=dtype)


def plan_optimizations(settings: HandlerSettings, placement: Placement) -> list[str]:
    """The speed and memory options to apply, in order, for this placement.

    SDPA attention is PyTorch's default in diffusers, so it needs no step; attention slicing replaces it
    to save memory. Model CPU offload moves each component to the GPU only while it runs, so it needs CUDA
    and replaces placing the whole pipeline on the device. Quantization comes before compiling (the compiled
    graph must see the quantized layers); torch.compile compiles the denoiser (and with compile_vae the VAE
    decoder), and the warm-up generations then pay the compilation instead of the first requests.
    """
    on_cuda = placement.device.startswith("cuda")
    if settings.cpu_offload and not on_cuda:
        raise RuntimeError("cpu_offload needs CUDA: it moves components to the GPU only while they run")
    steps = ["cpu_offload" if settings.cpu_offload else "place_on_device"]
    if settings.attention == "slicing":
        steps.append("attention_slicing")
    if settings.channels_last:
        steps.append("channels_last")
    if settings.fuse_qkv:
        steps.append("fuse_qkv")
    if settings.quantization != "none":
        steps.append("quantization")
    if settings.step_cache_threshold > 0:
        steps.append("step_cache")
    if settings.vae_slicing:
        steps.append("vae_slicing")
    if settings.vae_tiling:
        steps.append("vae_tiling")
    if settings.tf32:
        steps.append("tf32")  # before compiling: compiled kernels keep the matmul precision they saw
    if settings.torch_compile:
        steps.append("torch_compile")
    if settings.compile_vae:
        steps.append("compile_vae")
    return steps


def select_device(placement: Placement) -> None:
    """Make the worker's GPU the current CUDA device, so that calls naming no device (``torch.cuda.*``,
    ``empty_cache``, libraries' own allocations) use it rather than GPU 0 in every worker."""
    if placement.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(placement.device))


def available_cores() -> int:
    """Cores this process may run on: the affinity mask (taskset, cpusets) where the OS has one."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_worker(cores: int, live_workers: int, override: int) -> int:
    """Torch intra-op threads for one worker: an even share of the cores, or the configured number.

    Two workers that each use every core on a 2-core machine run ten times slower than one worker
    (measured on TorchServe 0.12); an even share keeps N workers from oversubscribing C cores.
    """
    if override > 0:
        return override
    return max(1, cores // max(1, live_workers))


class WorkerRegistry:
    """Counts the live workers of one model through pid files in the model directory they share.

    TorchServe does not tell a worker how many siblings it has, and the management API can scale them at any
    time, so each worker registers its pid and re-counts the live ones before each batch.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_model(cls, model_dir: Path) -> "WorkerRegistry":
        """The registry of a model's workers, in the temp folder: a model folder may be read-only."""
        key = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:16]
        return cls(Path(tempfile.gettempdir()) / "torchserve-diffusers-workers" / key)

    def register(self, pid: int) -> None:
        (self.folder / str(pid)).touch()

    def live_count(self) -> int:
        """Live registered workers, at least 1; 1 if the folder cannot be read (never fail a batch over it)."""
        try:
            return self._count_live()
        except OSError:
            return 1

    def _count_live(self) -> int:
        live = 0
        for entry in self.folder.iterdir():
            if not (entry.name.isascii() and entry.name.isdigit()):
                continue
            if _process_alive(int(entry.name)):
                live += 1
            else:
                entry.unlink(missing_ok=True)
        return max(live, 1)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
