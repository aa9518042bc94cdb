#!/usr/bin/env python3
"""Real scale: a full-size random-weight pipeline built, archived, served by TorchServe and measured against
raw diffusers holding the same folder, in one run.

    python benchmarks/realscale.py --quick            # SD 1.5 only (8-12 minutes on an idle 2-core VM)
    python benchmarks/realscale.py                    # then SDXL base and SD3 medium at 1024x1024
    python benchmarks/realscale.py --families sd3     # one family

Random weights cost what trained ones cost in time, memory and bytes (only the pictures are noise), so every
figure here stands for the real checkpoint of the same architecture (builder/full_size.py). Measured:
- build: ``build_mar.sh --tiny --full-size`` wall time (random weights made, then archived) and archive size;
- cold start: a plain Python process's start + imports + ``from_pretrained`` of the pipeline folder, against
  TorchServe's launch to a READY worker with the default .mar, split into what happens before the handler runs
  (TorchServe's start, its extraction of the .mar, the worker's imports), the handler's own unpacking (none with
  the stored layout), the pipeline load and the warm-up;
- disk held while serving beyond the archive (TorchServe's temporary folder);
- served against raw diffusers latency, taking turns so that a slow spell of a shared machine hits both (the
  median of each turn's ratio); the first request of each fresh worker (right after the warm-up, before the
  raw process loads) against the next ones;
- peak RSS per worker with one and two workers, against the raw process after the same request;
- each CPU preset against float32 eager on the same request, with the largest pixel difference;
- SDXL (without ``--quick``): one worker at 1024x1024 under a ``memory_budget_gb`` that holds one worker, and a
  scale-up to two that the budget refuses while the first worker goes on serving;
- SD3 medium without T5 (without ``--quick``): one worker at 1024x1024 against raw diffusers.
Memory: at most one served model and one raw process are alive at a time; the CPU presets, held at once
to take turns, peak at about 16 GB for SD 1.5.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.report import Row, at_least, at_most, markdown_table, median, write_json  # noqa: E402

STARTED = time.monotonic()
MODEL = "stable_diffusion"
PROMPT = "a photo of an astronaut riding a horse on the moon"


@dataclass(frozen=True)
class Case:
    """How one family is measured: the served size and steps; the timed turns (None: ``--runs``; a 1024x1024
    generation takes minutes here); whether raw diffusers runs beside it (SDXL's two processes would not fit
    in 24 GB), two workers are scaled up, or a second worker is refused by a budget that holds one."""

    side: int
    steps: int
    runs: int | None = None
    raw_baseline: bool = False
    two_workers: bool = False
    budget_for_one: bool = False


CASES = {
    "sd1": Case(512, 2, raw_baseline=True, two_workers=True),
    "sdxl": Case(1024, 2, runs=2, budget_for_one=True),
    "sd3": Case(1024, 2, runs=2, raw_baseline=True),
}
# The presets compared with float32 eager (handler settings).
PRESETS = {
    "float32 eager": {"dtype": "float32"},
    "bfloat16 eager": {"dtype": "bfloat16"},
    "bfloat16 channels-last": {"dtype": "bfloat16", "channels_last": True},
    "bfloat16 channels-last, inductor with freezing": {"dtype": "bfloat16", "channels_last": True,
                                                        "torch_compile": True, "compile_vae": True,
                                                        "compile_freezing": True},
}
# Served and raw both hold this one: a dtype alone, which raw diffusers takes as it is, so the two run the
# same kernels (the faster presets are the handler's own work; the preset comparison times them).
SERVED_PRESET = "bfloat16 eager"


def progress(message: str) -> None:
    print(f"[realscale {time.monotonic() - STARTED:7.1f}s] {message}", flush=True)


# ----------------------------------------------------------------------------------------- child processes


def child_main(arguments: argparse.Namespace) -> None:
    """A process holding one pipeline: plain diffusers (``--raw``) or the handler's loader with a preset.

    Prints one JSON line when loaded (seconds since the interpreter started, imports, load), then answers each
    JSON line on stdin ({"side", "steps", "save"}) with one JSON line holding the generation's seconds."""
    import_started = time.perf_counter()
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    imported = time.perf_counter()
    settings = json.loads(arguments.settings)
    dtype = getattr(torch, settings.get("dtype", "float32"))
    if arguments.raw:  # as a user loads it: SD3 without T5 needs text_encoder_3=None and tokenizer_3=None named
        index = json.loads((Path(arguments.folder) / "model_index.json").read_text())
        absent = {name: None for name, value in index.items() if value == [None, None]}
        pipeline = DiffusionPipeline.from_pretrained(arguments.folder, dtype=dtype, local_files_only=True, **absent)
    else:
        from handler.core.settings import HandlerSettings
        from handler.model.device import Placement
        from handler.model.loading import load_pipeline

        pipeline = load_pipeline(Path(arguments.folder), Placement("cpu", dtype), HandlerSettings.from_mapping(settings))
    pipeline.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    print(json.dumps({"imports": imported - import_started, "load": loaded - imported}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        started, cpu_started = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            images = pipeline(PROMPT, width=command["side"], height=command["side"],
                              num_inference_steps=command["steps"], guidance_scale=7.5, output_type="np",
                              generator=torch.Generator().manual_seed(0)).images
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        if command.get("save"):
            np.save(command["save"], (images[0] * 255).round().astype("uint8"))
        print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "finite": bool(np.isfinite(images).all())}),
              flush=True)


@dataclass(frozen=True)
class Timing:
    """A generation's wall seconds and the CPU seconds its process spent on it. On a machine shared with other
    jobs the wall time moves with their load; the CPU time much less, so ratios are taken on both."""

    wall: float
    cpu: float


class Child:
    """A child process holding a pipeline (see child_main), driven line by line."""

    def __init__(self, folder: Path, settings: dict, raw: bool):
        started = time.perf_counter()
        command = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder), "--settings",
                   json.dumps(settings)] + (["--raw"] if raw else [])
        self.errors = tempfile.TemporaryFile(mode="w+")  # diffusers' warnings and, if it dies, why
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        stderr=self.errors, env={**_offline_environment()})
        self.loaded = self._answer()
        self.cold_start = time.perf_counter() - started

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            exit_code = self.process.wait()
            self.errors.seek(0)
            raise RuntimeError(f"the child process died (exit {exit_code}): {self.errors.read()[-2000:]}")
        return json.loads(line)

    def generate(self, side: int, steps: int, save: Path | None = None) -> Timing:
        self.process.stdin.write(json.dumps({"side": side, "steps": steps, "save": str(save) if save else ""}) + "\n")
        self.process.stdin.flush()
        answer = self._answer()
        if not answer["finite"]:
            raise RuntimeError("the raw pipeline made a NaN image")
        return Timing(answer["seconds"], answer["cpu_seconds"])

    def peak_rss(self) -> int:
        return peak_rss(self.process.pid)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.errors.close()


def _offline_environment() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


# ------------------------------------------------------------------------------------------------ serving


def model_config(path: Path, preset: dict, side: int, memory_budget_gb: float = 0.0) -> Path:
    """The shipped model-config.yaml with the preset's handler settings, the served default size and a memory
    budget (0: none)."""
    import yaml

    config = yaml.safe_load((REPO_ROOT / "model-config.yaml").read_text())
    config["handler"] = {**(config.get("handler") or {}), **preset, "default_width": side, "default_height": side,
                         "memory_budget_gb": memory_budget_gb}
    path.write_text(yaml.safe_dump(config))
    return path


def build_archive(family: str, work: Path, config: Path, weights_dtype: str) -> tuple[Path, float]:
    """``build_mar.sh --tiny --full-size`` into ``work``: (the .mar, wall seconds)."""
    started = time.perf_counter()
    dtype = ["--weights-dtype", weights_dtype] if weights_dtype != "float16" else []
    subprocess.run([str(REPO_ROOT / "build_mar.sh"), "--tiny", "--full-size", "--family", family, "--config-file",
                    str(config), "--export-path", str(work / "store"), "--work-dir", str(work / "scratch"), *dtype],
                   check=True, env=_offline_environment())
    return work / "store" / f"{MODEL}.mar", time.perf_counter() - started


def log_time(log: str, pattern: str) -> float:
    """When TorchServe's log first shows ``pattern`` (seconds since the epoch; its timestamps are local time)."""
    from datetime import datetime

    for line in log.splitlines():
        if re.search(pattern, line):
            return datetime.strptime(line[:23], "%Y-%m-%dT%H:%M:%S,%f").timestamp()
    raise RuntimeError(f"TorchServe's log never shows {pattern!r}")


def cold_start_split(server, launched_at: float) -> dict[str, float]:
    """Where a cold start's seconds went, from the frontend's and the worker's logs: TorchServe's own start,
    its extraction of the .mar, the worker process's start and the handler module's imports, then the
    handler's initialize (pipeline read and placed, the rest of the assembly, the warm-up)."""
    frontend = (server.folder / "logs" / "ts_log.log").read_text(errors="replace")
    log = (server.folder / "logs" / "model_log.log").read_text(errors="replace")
    extracting = log_time(frontend, r"Loading initial models")
    extracted = log_time(frontend, rf"Model {MODEL} loaded")
    ready = log_time(frontend, r"State change WORKER_STARTED -> WORKER_MODEL_LOADED")
    initialize = log_seconds(log, r"worker \d+ ready in (\d+\.\d+) s")
    load = log_seconds(log, r"read \w+ from .* in (\d+\.\d+) s") + log_seconds(log, r"placed \w+ on .* in (\d+\.\d+) s")
    warmup = log_seconds(log, r"warm-up generation at .* took (\d+\.\d+) s")
    return {"TorchServe start (CLI, JVM)": extracting - launched_at,
            "TorchServe's extraction of the .mar": extracted - extracting,
            "worker process start and the handler's imports": ready - initialize - extracted,
            "pipeline load (read and placed)": load,
            "rest of initialize (diffusers' pipeline imports, task pipelines, adapters, contract)":
                initialize - load - warmup,
            "warm-up": warmup}


def log_seconds(log: str, pattern: str) -> float:
    """The sum of every ``(\\d+.\\d+) s`` figure the worker log gives for ``pattern``."""
    return sum(float(value) for value in re.findall(pattern, log))


def process_cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def served_request(server, side: int, steps: int, worker: int | None = None) -> Timing:
    """One served generation: its wall time at the client and the CPU time of ``worker`` (the worker's pid)."""
    import requests

    cpu_started = process_cpu_seconds(worker) if worker else 0.0
    started = time.perf_counter()
    response = requests.post(f"{server.inference_url}/predictions/{MODEL}", headers=server.inference_headers(),
                             json={"prompt": PROMPT, "width": side, "height": side, "num_inference_steps": steps,
                                   "seed": 0, "output_format": "png"}, timeout=3600)
    if response.status_code != 200:
        raise RuntimeError(f"served request failed: {response.status_code} {response.text[:300]}")
    wall = time.perf_counter() - started
    return Timing(wall, process_cpu_seconds(worker) - cpu_started if worker else 0.0)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def scale(server, workers: int) -> None:
    import requests

    response = requests.put(f"{server.management_url}/models/{MODEL}?min_worker={workers}&max_worker={workers}"
                            f"&synchronous=true", headers=server.management_headers(), timeout=1800)
    if response.status_code >= 300:
        raise RuntimeError(f"scaling to {workers} workers failed: {response.status_code} {response.text[:300]}")
    deadline = time.monotonic() + 1800
    while server.ready_workers(MODEL) != workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{workers} workers never became READY")
        time.sleep(1)


def extracted_pipeline(server) -> Path:
    """The pipeline folder TorchServe extracted the .mar into (what the worker loads)."""
    return next((server.folder / "tmp" / "models").glob("*/pipeline"))


def shared_memory(pids: list[int]) -> tuple[int, int]:
    """(sum of the processes' proportional set sizes, sum of their unique set sizes): shared pages count once
    in the first, not at all in the second."""
    import psutil

    infos = [psutil.Process(pid).memory_full_info() for pid in pids]
    return sum(info.pss for info in infos), sum(info.uss for info in infos)


def one_worker_budget_gb(family: str, weights_dtype: str) -> float:
    """A memory_budget_gb that holds one worker and not two: 1.5 times what the memory ledger reserves for one
    (its weights in the served dtype, counted from the published configs, plus the working memory)."""
    import torch

    from builder.full_size import count_parameters
    from handler.model.memory_budget import WORKING_MEMORY_BYTES

    itemsize = torch.tensor([], dtype=getattr(torch, weights_dtype)).element_size()
    return round(1.5 * (sum(count_parameters(family).values()) * itemsize + WORKING_MEMORY_BYTES) / 1e9, 1)


def second_worker_refused(server, group: str, side: int, steps: int, budget_gb: float) -> list[Row]:
    """Scale to two workers under a budget that holds one: the scale-up must fail, the log must say why, and
    the first worker must go on serving."""
    import requests

    progress(f"{group}: a second worker under memory_budget_gb {budget_gb:g} (holds one)")
    response = requests.put(f"{server.management_url}/models/{MODEL}?min_worker=2&max_worker=2&synchronous=true",
                            headers=server.management_headers(), timeout=1800)
    log = (server.folder / "logs" / "model_log.log").read_text(errors="replace")
    refusal = next((line.split(" exception ", 1)[-1] for line in log.splitlines() if "memory_budget_gb:" in line), "")
    if response.status_code < 400 or not refusal:
        raise RuntimeError(f"the second worker was not refused: {response.status_code} {response.text[:300]}")
    progress(f"{group}: refused ({response.status_code}): {refusal}")
    after = served_request(server, side, steps)
    return [Row(group, f"second worker under memory_budget_gb {budget_gb:g}: scale-up answer", response.status_code,
                "HTTP", n=1),
            Row(group, "first worker serving after the refusal: latency", after.wall, "s", n=1)]


def measure_family(family: str, work: Path, runs: int, weights_dtype: str) -> list[Row]:
    from harness.local_server import LocalTorchServe

    case = CASES[family]
    side, steps, runs = case.side, case.steps, case.runs or runs
    group = f"{family} full size"
    request = f"{side}x{side}, {steps} steps"
    rows = []
    work.mkdir(parents=True, exist_ok=True)
    progress(f"{group}: building the archive (random weights, published configs)")
    budget_gb = one_worker_budget_gb(family, weights_dtype) if case.budget_for_one else 0.0
    config = model_config(work / "model-config.yaml", PRESETS[SERVED_PRESET], side, budget_gb)
    mar, build_seconds = build_archive(family, work, config, weights_dtype)
    rows += [Row(group, f"build_mar.sh --tiny --full-size, weights {weights_dtype} (made + archived)",
                 build_seconds, "s", n=1),
             Row(group, "archive size", mar.stat().st_size / 1e9, "GB", n=1)]

    server, raw = None, None
    try:
        starts, raw_starts, splits, first_requests = [], [], [], []
        for turn in range(runs):  # taking turns with raw diffusers, each on a fresh server folder
            if server is not None:
                server.stop()
            os.sync()  # the build's (or the last server's) writes land before the clock starts, not during it
            progress(f"{group}: TorchServe cold start with the default .mar, turn {turn + 1}/{runs}")
            server = LocalTorchServe(work / f"server-{turn + 1}", work / "store", {MODEL: mar.name})
            launched, launched_at = time.perf_counter(), time.time()
            server.start(timeout=3600)
            starts.append(time.perf_counter() - launched)
            splits.append(cold_start_split(server, launched_at))
            # The first request of each fresh worker, right after its warm-up and before the raw process loads
            # beside it (a pipeline loading beside a worker slowed the next generation of both: 1.16x served,
            # 1.18x raw); one per cold start, as one generation moves by +-10% here.
            progress(f"{group}: {request}: the first served request, turn {turn + 1}/{runs}")
            first_requests.append(served_request(server, side, steps, server.worker_pids(MODEL)[0]))
            if case.raw_baseline:  # the same files the worker loaded, as warm in the page cache
                progress(f"{group}: raw diffusers cold start (process start, imports, from_pretrained), "
                         f"turn {turn + 1}/{runs}")
                raw = Child(extracted_pipeline(server), PRESETS[SERVED_PRESET], raw=True)
                raw_starts.append(raw)
                if turn < runs - 1:
                    raw.close()
                    raw = None
        cold_start = median(starts)
        split = {name: median([each[name] for each in splits]) for name in splits[0]}
        if raw_starts:
            raw_cold_start = median([child.cold_start for child in raw_starts])
            rows += [Row(group, "raw diffusers: process start to loaded pipeline", raw_cold_start, "s", n=runs,
                         samples=[child.cold_start for child in raw_starts]),
                     Row(group, "raw diffusers: imports", median([child.loaded["imports"] for child in raw_starts]),
                         "s", n=runs),
                     Row(group, "raw diffusers: from_pretrained", median([child.loaded["load"] for child in raw_starts]),
                         "s", n=runs)]
        rows += [Row(group, "served: launch to READY worker", cold_start, "s", n=runs, samples=starts,
                     target=None if not raw_starts else at_most(1.5 * raw_cold_start + 5))]
        rows += [Row(group, f"served: {name}", seconds, "s", n=runs) for name, seconds in split.items()]
        rows += [Row(group, "disk held while serving beyond the archive", folder_bytes(server.folder / "tmp") / 1e9,
                     "GB", n=1),
                 Row(group, "copies of the weights beyond the archive",
                     folder_bytes(server.folder / "tmp") / mar.stat().st_size, "x", n=1, target=at_most(1.05))]
        if raw_starts:
            rows.append(Row(group, "cold start: served / raw", cold_start / raw_cold_start, "x", n=runs))
        served, raw_timings = [], []
        worker = server.worker_pids(MODEL)[0]
        for turn in range(runs):
            progress(f"{group}: {request}, turn {turn + 1}/{runs}: served")
            served.append(served_request(server, side, steps, worker))
            if raw is not None:
                progress(f"{group}: {request}, turn {turn + 1}/{runs}: raw diffusers")
                raw_timings.append(raw.generate(side, steps))
        walls, cpus = [timing.wall for timing in served], [timing.cpu for timing in served]
        rows += [Row(group, f"served latency {request}", median(walls), "s", n=runs, samples=walls),
                 Row(group, f"served worker CPU time {request}", median(cpus), "s", n=runs, samples=cpus),
                 Row(group, "served: first request after the warm-up / the next ones (CPU time, medians)",
                     median([timing.cpu for timing in first_requests]) / median(cpus), "x", n=runs,
                     target=at_most(1.1)),
                 Row(group, "peak RSS, one worker", peak_rss(worker) / 1e9, "GB", n=1)]
        if raw is not None:
            raw_walls, raw_cpus = [timing.wall for timing in raw_timings], [timing.cpu for timing in raw_timings]
            rows += [Row(group, f"raw diffusers latency {request}", median(raw_walls), "s", n=runs,
                         samples=raw_walls),
                     Row(group, f"raw diffusers CPU time {request}", median(raw_cpus), "s", n=runs, samples=raw_cpus),
                     Row(group, "served / raw latency (median of each turn's ratio)",
                         median([one / other for one, other in zip(walls, raw_walls)]), "x", n=runs,
                         target=at_most(1.03)),
                     Row(group, "served / raw CPU time (median of each turn's ratio)",
                         median([one / other for one, other in zip(cpus, raw_cpus)]), "x", n=runs,
                         target=at_most(1.03)),
                     Row(group, "peak RSS, raw diffusers after the same requests", raw.peak_rss() / 1e9, "GB", n=1),
                     Row(group, "peak RSS: one worker / raw", peak_rss(worker) / raw.peak_rss(), "x", n=1,
                         target=at_most(1.15))]
            raw.close()
            raw = None
        if case.budget_for_one:
            rows += second_worker_refused(server, group, side, steps, budget_gb)
        if case.two_workers:
            progress(f"{group}: scaling to two workers")
            scale(server, 2)
            pids = server.worker_pids(MODEL)
            progress(f"{group}: one request per worker, at once")
            threads = [threading.Thread(target=served_request, args=(server, side, steps)) for _ in pids]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            peaks = [peak_rss(pid) for pid in pids]
            proportional, unique = shared_memory(pids)
            rows += [Row(group, "peak RSS per worker, two workers (max)", max(peaks) / 1e9, "GB", n=2),
                     Row(group, "peak RSS, two workers added up", sum(peaks) / 1e9, "GB", n=2),
                     Row(group, "two workers after the requests: PSS added up (shared pages once)",
                         proportional / 1e9, "GB", n=2),
                     Row(group, "two workers after the requests: USS added up (pages of their own)", unique / 1e9,
                         "GB", n=2)]
    finally:
        if raw is not None:
            raw.close()
        server.stop()
    return rows


# ---------------------------------------------------------------------------------------------- presets


def compare_presets(folder: Path, side: int, steps: int, runs: int, scratch: Path) -> list[Row]:
    """Every preset in its own process, all held at once (about 16 GB for SD 1.5: float32 and three bfloat16
    copies), each warmed up by one untimed generation at the timed size (a compiled preset compiles there),
    then timed at ``side`` taking turns, one generation per preset a round, so that a slow spell of the machine
    hits every preset alike instead of whichever happened to run then."""
    import numpy as np

    group = f"CPU presets, {side}x{side}, {steps} steps"
    children = {}
    try:
        for name, settings in PRESETS.items():
            progress(f"{group}: loading and warming up {name}")
            children[name] = Child(folder, settings, raw=False)
            children[name].generate(side, steps)
        timings = {name: [] for name in PRESETS}
        for turn in range(runs):
            for index, (name, child) in enumerate(children.items()):
                progress(f"{group}: turn {turn + 1}/{runs}, {name}")
                timings[name].append(child.generate(side, steps, save=scratch / f"{index}.npy"))
    finally:
        for child in children.values():
            child.close()
    images = {name: np.load(scratch / f"{index}.npy") for index, name in enumerate(PRESETS)}
    baseline = timings["float32 eager"]
    rows = []
    for name, measured in timings.items():
        walls, cpus = [timing.wall for timing in measured], [timing.cpu for timing in measured]
        difference = int(np.abs(images[name].astype(int) - images["float32 eager"].astype(int)).max())
        mean = float(np.abs(images[name].astype(float) - images["float32 eager"].astype(float)).mean())
        rows += [Row(group, f"{name}: latency", median(walls), "s", n=runs, samples=walls),
                 Row(group, f"{name}: CPU time", median(cpus), "s", n=runs, samples=cpus),
                 Row(group, f"{name}: speed-up vs float32 eager (latency)",
                     median([timing.wall for timing in baseline]) / median(walls), "x", n=runs),
                 Row(group, f"{name}: speed-up vs float32 eager (CPU time)",
                     median([timing.cpu for timing in baseline]) / median(cpus), "x", n=runs,
                     target=None if name == "float32 eager" else at_least(4.0)),
                 Row(group, f"{name}: largest pixel difference vs float32", difference, "levels", n=1),
                 Row(group, f"{name}: mean pixel difference vs float32", mean, "levels", n=1)]
    return rows


def cpu_description() -> str:
    """The CPU's model name and the bfloat16 instructions it has (they decide what the bfloat16 presets gain)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    bf16 = sorted(set(flags.group(1).split()) & {"amx_bf16", "avx512_bf16"}) if flags else []
    return f"{model.group(1) if model else 'unknown CPU'} ({' '.join(bf16) or 'no bfloat16 instructions'})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SD 1.5 only (same as --families sd1)")
    parser.add_argument("--families", nargs="+", choices=tuple(CASES), default=list(CASES),
                        help="the families to measure (default: all); the CPU presets are timed on sd1")
    parser.add_argument("--runs", type=int, default=3,
                        help="timed turns per measurement, at least 2 (default: %(default)s: a median of 3 holds "
                             "against one slow call)")
    parser.add_argument("--weights-dtype", default="bfloat16", choices=("float16", "bfloat16"),
                        help="the archive's weights: bfloat16 = the served dtype, so workers map and share them; "
                             "float16 = as published, converted by each worker (default: %(default)s)")
    parser.add_argument("--skip-presets", action="store_true", help="leave out the CPU preset comparison")
    parser.add_argument("--work-dir", type=Path, help="where archives and servers go (default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "realscale.json")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.child:
        arguments.folder = arguments.child
        child_main(arguments)
        return 0
    import torch

    work = arguments.work_dir or Path(tempfile.mkdtemp(prefix="realscale-"))
    rows, complete = [], False
    try:
        for family in ["sd1"] if arguments.quick else arguments.families:
            rows += measure_family(family, work / family, max(arguments.runs, 2), arguments.weights_dtype)
            if family == "sd1" and not arguments.skip_presets:
                rows += compare_presets(work / family / "scratch" / "full-sd1", CASES["sd1"].side,
                                        CASES["sd1"].steps, max(arguments.runs, 2), work / family)
            shutil.rmtree(work / family, ignore_errors=True)
        complete = True
    finally:  # a family that fails keeps the figures measured before it (the JSON says it is incomplete)
        if arguments.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        context = {"machine": f"{cpu_description()}, {torch.get_num_threads()} torch threads",
                   "torch": torch.__version__, "served_preset": SERVED_PRESET,
                   "weights_dtype": arguments.weights_dtype, "prompt": PROMPT, "quick": arguments.quick,
                   "complete": complete, "seconds": time.monotonic() - STARTED}
        if rows:
            print()
            print(markdown_table(rows))
            write_json(arguments.output, rows, context)
            progress(f"wrote {arguments.output}" + ("" if complete else " (incomplete: a family failed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
