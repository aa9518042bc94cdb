"""Refuse to load a worker that would not fit in memory, with a message, instead of swapping or being killed.

A full-size pipeline holds gigabytes per worker (SD 1.5: 4.3 GB of float32 weights; SDXL: 14 GB), and
TorchServe scales workers up without asking whether they fit: on a host that is short, the kernel swaps or
OOM-kills a worker mid-request. Before loading, each worker estimates what it will hold (its weights in the
served dtype, read from the safetensors headers without loading anything, plus working memory) and reserves
it under a lock shared by the model's workers on this host. It is refused, naming what it needs and what is
left, when the reservations of the model's other workers plus its own exceed ``memory_budget_gb``, or when the
host (RAM, or the GPU's free memory on CUDA) has less available than it needs, after what workers still loading
have reserved. (DiffSynth-Studio's ``vram_limit`` plays the same part for VRAM.)
"""

import fcntl
import json
import math
import os
from pathlib import Path

import torch

from handler.core.settings import HandlerSettings
from handler.model.device import _process_alive
from handler.model.pipeline_index import read_model_index
from handler.model.weight_files import read_header

# Memory a worker holds beyond its weights while generating (activations, the torch runtime, TorchServe's
# worker): measured on a full-size SD 1.5 at 512x512 in bfloat16 (benchmarks/realscale.py). Larger images
# need more; raise memory_budget_gb headroom accordingly.
WORKING_MEMORY_BYTES = 1_000_000_000
RESERVATIONS = "memory-reservations.json"


class MemoryBudgetError(RuntimeError):
    """This worker would not fit in the memory the budget or the host leaves it."""


def safetensors_elements(path: Path) -> int:
    """The number of tensor elements a .safetensors file holds, from its checked header alone."""
    return sum(math.prod(entry["shape"]) for entry in read_header(path, "memory_budget_gb").values())


def weight_files(folder: Path, settings: HandlerSettings) -> list[Path]:
    """The safetensors files ``load_pipeline`` will read: the components model_index.json names (not the
    safety checker when it is off), the ``variant`` ones if a variant is set, else the plain ones."""
    skipped = set() if settings.safety_checker else {"safety_checker"}
    files = []
    for name, value in read_model_index(folder).items():
        if name.startswith("_") or not isinstance(value, list) or None in value or name in skipped:
            continue
        for path in sorted((Path(folder) / name).glob("*.safetensors")):
            parts = path.name.split(".")
            variant = parts[-2] if len(parts) > 2 else ""
            if variant == settings.variant:
                files.append(path)
    return files


def weight_bytes(folder: Path, settings: HandlerSettings, dtype: torch.dtype) -> int:
    """What the pipeline's weights take in memory in the served dtype (fp16 files served as float32 double)."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return sum(safetensors_elements(path) for path in weight_files(folder, settings)) * itemsize


def available_bytes(device: str) -> int:
    """Memory this host can still give: MemAvailable on a CPU, the GPU's free memory on CUDA."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise MemoryBudgetError("memory_budget_gb: /proc/meminfo has no MemAvailable; cannot tell what fits")


class MemoryReservations:
    """What each live worker of one model on this host holds or is loading, in a JSON file beside the worker
    registry, read and written under a file lock so that workers starting together are counted."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / RESERVATIONS
        self.lock_path = Path(folder) / f".{RESERVATIONS}.lock"

    def reserve(self, pid: int, device: str, weights: int, settings: HandlerSettings, dtype: torch.dtype,
                available=available_bytes) -> int:
        """Reserve this worker's memory or raise MemoryBudgetError saying why it does not fit; returns the bytes
        reserved. ``available(device)`` is the host's free memory (a parameter so tests can set it)."""
        need = weights + WORKING_MEMORY_BYTES
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            others = {key: entry for key, entry in self._read().items()
                      if int(key) != pid and entry["device"] == device and _process_alive(int(key))}
            held = sum(entry["bytes"] for entry in others.values())
            loading = sum(entry["bytes"] for entry in others.values() if not entry["loaded"])
            needs = (f"this worker needs about {need / 1e9:.1f} GB ({weights / 1e9:.1f} GB of weights in "
                     f"{str(dtype).removeprefix('torch.')} + {WORKING_MEMORY_BYTES / 1e9:.1f} GB working memory)")
            advice = ("serve fewer workers (maxWorkers), a smaller dtype (bfloat16 halves float32) or a host with "
                      "more memory")
            budget = int(settings.memory_budget_gb * 1e9)
            if budget and held + need > budget:
                raise MemoryBudgetError(
                    f"memory_budget_gb: {needs}, but the model's {len(others)} other worker(s) on {device} hold "
                    f"{held / 1e9:.1f} GB of its {settings.memory_budget_gb:g} GB budget; this worker is not "
                    f"started: {advice}, or raise memory_budget_gb")
            free = available(device) - loading
            if need > free:
                still = f" once {loading / 1e9:.1f} GB reserved by workers still loading is counted" if loading else ""
                raise MemoryBudgetError(
                    f"memory_budget_gb: {needs}, but {device} has {free / 1e9:.1f} GB available{still}; this "
                    f"worker is not started (it would swap or be killed): {advice}")
            self._write({**others, str(pid): {"bytes": need, "device": device, "loaded": False}})
        return need

    def mark_loaded(self, pid: int) -> None:
        """The worker's memory is now held (and counted by the host's available memory)."""
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            reservations = self._read()
            if str(pid) in reservations:
                reservations[str(pid)]["loaded"] = True
                self._write(reservations)

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _write(self, reservations: dict) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(reservations))
        os.replace(partial, self.path)
