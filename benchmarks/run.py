#!/usr/bin/env python3
"""Benchmark the diffusers handler on a real TorchServe against in-process generation and an upstream baseline.

    python benchmarks/run.py            # full run (about 16 minutes on 2 idle cores; docs/performance.md)
    python benchmarks/run.py --quick    # smaller sizes and fewer runs (a couple of minutes), to check the script
    python benchmarks/run.py --output results.json
    python benchmarks/run.py --only workers   # one section (repeatable): overhead, batching, workers, ...

Everything is built and measured in one run, from one tiny random-weight pipeline: the archives (with
build_mar.sh, as a user builds them), the servers (LocalTorchServe, loopback only, always stopped) and the
in-process reference. Every number is a median over repeated runs and the table says how many. The tiny
pipeline makes generation cheap, so serving costs (encoding, transfer, TorchServe's own work) show up
more than they would with a real model: the ratios here are upper bounds for real models.

Measured:
1. serving overhead: median request latency through TorchServe (client reads the whole body) divided by
   the median time of the same request (same seed and settings) through our handler's inference step in
   this process (GenerationEngine on the pipeline load_pipeline loaded, the worker's torch thread count);
2. the same ratio for benchmarks/upstream_handler.py, which behaves like TorchServe's examples/diffusers;
3. throughput with concurrent clients: 1 vs 2 workers, and batchSize 1 vs 4;
4. response bytes and in-process encode time per output format, plus upstream's json.dumps(indent=2);
5. cold start: LocalTorchServe.start() until a READY worker;
6. build_mar.sh time and output size for --archive-format zip vs no-archive on a large pipeline folder.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402
import huggingface_hub  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402

from benchmarks.report import Row, Target, at_least, at_most, markdown_table, median, write_json  # noqa: E402
from handler.model.device import available_cores  # noqa: E402
from handler.core.encoding import encode_images  # noqa: E402
from handler.core.generation import GenerationResult  # noqa: E402
from harness.local_server import LocalTorchServe  # noqa: E402
from handler.core.encoding import OUTPUT_FORMATS  # noqa: E402
from builder.tiny_pipeline import build_tiny_pipeline  # noqa: E402

OURS = "stable_diffusion"
OURS_BATCHED = "stable_diffusion_batch4"
UPSTREAM_HANDLER = REPO_ROOT / "benchmarks" / "upstream_handler.py"
PROMPT = "a photo of an astronaut riding a horse on mars"
SEED = 0
REQUEST_TIMEOUT_S = 600
BUILD_TIMEOUT_S = 1800
# The shipped config.properties already allows 64 MiB responses; naming it keeps the upstream baseline's
# 26 MB reply at 768x768 from killing its worker even if the shipped value changes. System metrics are off
# because their collector starts a Python process every minute, a CPU spike that lands in random samples.
SERVER_OVERRIDES = {"max_response_size": "67108864", "disable_system_metrics": "true"}
# Serving-overhead targets by (side, steps) and output format; other settings (quick mode) have none.
OVERHEAD_TARGETS = {(768, 2): {"png": 1.06, "array": 1.10}, (768, 50): {"png": 1.03, "array": 1.03}}


@dataclass(frozen=True)
class Plan:
    """Sizes and repetition counts of one benchmark mode."""

    mode: str
    latency: tuple[tuple[int, int, int], ...]  # (side, steps, runs) for the serving-overhead ratios
    clients: int
    requests_per_client: int
    throughput_rounds: int
    encode_runs: int
    upstream_encode_runs: int
    cold_starts: int
    build_bytes: int
    build_runs: int
    workers_setting: tuple[int, int] = (256, 20)  # (side, steps)
    batch_setting: tuple[int, int] = (128, 20)
    encode_side: int = 768


FULL = Plan("full", latency=((768, 2, 10), (768, 50, 5)), clients=8, requests_per_client=4, throughput_rounds=3,
            encode_runs=20, upstream_encode_runs=5, cold_starts=3, build_bytes=2**30, build_runs=3)
QUICK = Plan("quick", latency=((256, 2, 5),), clients=8, requests_per_client=1, throughput_rounds=1,
             encode_runs=3, upstream_encode_runs=1, cold_starts=1, build_bytes=100 * 10**6, build_runs=2)

# The measurements of the module docstring, by name, for --only.
SECTIONS = ("overhead", "batching", "workers", "encoding", "cold-start", "build")

STARTED = time.monotonic()


def progress(message: str) -> None:
    print(f"[bench {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few runs, to check the script")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "latest.json",
                        help="where the JSON results go (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path,
                        help="keep archives, server logs and build logs here (default: a temporary folder, "
                             "removed at the end)")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help=f"run only this section (repeatable; one of {', '.join(SECTIONS)}; default: all)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- building


def run_logged(command: list, log: Path, env: dict) -> float:
    """Run a command with its output in ``log``; return its wall time. Fails with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "wb") as output:
        result = subprocess.run([str(part) for part in command], stdout=output, stderr=subprocess.STDOUT, env=env,
                                timeout=BUILD_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{command[0]} failed (exit {result.returncode}); end of {log}:\n{tail}")
    return elapsed


def build_environment(work: Path) -> dict:
    """build_mar.sh with this Python; torch-model-archiver stages its copy in TMPDIR, kept inside ``work``."""
    tmp = work / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp)}


def build_mar(work: Path, log_name: str, *arguments) -> float:
    """Run build_mar.sh as a user would; return its wall time."""
    return run_logged([REPO_ROOT / "build_mar.sh", *arguments], work / "logs" / f"{log_name}.log",
                      build_environment(work))


def batched_config(work: Path) -> Path:
    """A copy of the shipped model-config.yaml with batchSize 4 and maxBatchDelay 100."""
    text = (REPO_ROOT / "model-config.yaml").read_text()
    for key, value in (("batchSize", 4), ("maxBatchDelay", 100)):
        text, count = re.subn(rf"^{key}:.*$", f"{key}: {value}", text, flags=re.MULTILINE)
        if count != 1:
            raise RuntimeError(f"model-config.yaml has {count} '{key}:' lines; expected one")
    path = work / "model-config-batch4.yaml"
    path.write_text(text)
    return path


def upstream_name(side: int, steps: int) -> str:
    return f"upstream_{side}x{side}_{steps}"


def build_upstream_archive(work: Path, pipeline: Path, store: Path, side: int, steps: int) -> None:
    """Pack the baseline handler with the pipeline as a plain folder (``model/``) and its own steps and size.

    Upstream zips the pipeline and unzips it in initialize; packing it as a folder changes only the load,
    which this benchmark does not time for the baseline.
    """
    name = upstream_name(side, steps)
    staging = work / f"staging-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(pipeline, staging / "model")
    config = work / f"model-config-{name}.yaml"
    config.write_text(f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: 1\nresponseTimeout: {REQUEST_TIMEOUT_S}\n"
                      f"baseline:\n  num_inference_steps: {steps}\n  width: {side}\n  height: {side}\n")
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    run_logged([archiver, "--model-name", name, "--version", "1.0", "--handler", UPSTREAM_HANDLER,
                "--extra-files", staging, "--config-file", config, "--export-path", store, "--force"],
               work / "logs" / f"build-{name}.log", build_environment(work))
    shutil.rmtree(staging)


def build_archives(work: Path, pipeline: Path, plan: Plan, sections: set[str]) -> Path:
    """Our .mar, and for the sections that use them a batchSize-4 copy of it and one upstream archive per
    latency setting, in one model store."""
    store = work / "model_store"
    progress(f"building {OURS}.mar with build_mar.sh --model-dir")
    build_mar(work, f"build-{OURS}", "--model-dir", pipeline, "--export-path", store,
              "--work-dir", work / "scratch", "--name", OURS, "--force")
    if "batching" in sections:
        progress(f"building {OURS_BATCHED}.mar (batchSize 4, maxBatchDelay 100)")
        build_mar(work, f"build-{OURS_BATCHED}", "--model-dir", pipeline, "--export-path", store, "--work-dir",
                  work / "scratch", "--name", OURS_BATCHED, "--config-file", batched_config(work), "--force")
    if "overhead" in sections:
        for side, steps, _ in plan.latency:
            progress(f"building the upstream-style baseline archive {upstream_name(side, steps)}.mar")
            build_upstream_archive(work, pipeline, store, side, steps)
    return store


# ----------------------------------------------------------------------------------------------- in-process


class InProcess:
    """The reference: our handler initialised in this process as a worker initialises it, with no server.

    Driving the real handler (with TorchServe's own Context, as TorchServe's unit tests do) gives the
    reference the worker's settings, pipeline loading, optimisations and thread count (cores / 1 live
    worker) without repeating any of that here.
    """

    def __init__(self, pipeline: Path, model_dir: Path):
        import ts
        from ts.context import Context
        from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

        from handler.stable_diffusion_handler import StableDiffusionHandler

        shutil.copytree(pipeline, model_dir / "pipeline")
        metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
        metrics.initialize_cache()
        model_config = yaml.safe_load((REPO_ROOT / "model-config.yaml").read_text())
        context = Context(OURS, str(model_dir), None, 1, None, ts.__version__, metrics=metrics,
                          model_yaml_config=model_config)
        self.handler = StableDiffusionHandler()
        self.handler.initialize(context)

    def generate(self, body: dict) -> GenerationResult:
        """Parse ``body`` as the handler does and run it through the handler's inference step."""
        ((outcome, _),) = self.handler.inference([self.handler.contract.parse(body)])
        if not isinstance(outcome, GenerationResult):
            raise RuntimeError(f"in-process generation failed: {outcome}")
        return outcome

    def time_generation(self, body: dict) -> float:
        """Seconds of the inference step alone: parsing, like encoding, is part of what serving adds."""
        request = self.handler.contract.parse(body)
        started = time.perf_counter()
        self.handler.inference([request])
        return time.perf_counter() - started


def request_body(side: int, steps: int, output_format: str, seed: int = SEED) -> dict:
    return {"prompt": PROMPT, "seed": seed, "num_inference_steps": steps, "width": side, "height": side,
            "output_format": output_format}


def measure_encoding(reference: InProcess, plan: Plan) -> list[Row]:
    """Bytes and in-process encode time of one 2-step image in every output format, and upstream's JSON."""
    side = plan.encode_side
    progress(f"encoding: generating one {side}x{side}/2-step image, then encoding it "
             f"{plan.encode_runs}x per format and {plan.upstream_encode_runs}x upstream-style")
    result = reference.generate(request_body(side, 2, "array"))
    request = result.request
    group = f"encoding {side}x{side}"
    rows, sizes = [], {}
    for output_format in OUTPUT_FORMATS:
        samples = []
        for _ in range(plan.encode_runs):
            started = time.perf_counter()
            body = encode_images(result.images, output_format, list(request.seeds), result.parameters(),
                                 result.timings_ms, result.nsfw)
            samples.append((time.perf_counter() - started) * 1000)
        sizes[output_format] = len(body)
        rows += [Row(group, f"{output_format}: response bytes", len(body), "bytes"),
                 Row(group, f"{output_format}: encode time", median(samples), "ms", len(samples), samples=samples)]
    samples = []
    for _ in range(plan.upstream_encode_runs):
        started = time.perf_counter()
        body = json.dumps(np.array(result.images[0]).tolist(), indent=2).encode("utf-8")
        samples.append((time.perf_counter() - started) * 1000)
    rows += [Row(group, "upstream json.dumps(indent=2): response bytes", len(body), "bytes"),
             Row(group, "upstream json.dumps(indent=2): encode time", median(samples), "ms", len(samples),
                 samples=samples),
             Row(group, "array bytes / png bytes (how many times smaller PNG is)", sizes["array"] / sizes["png"],
                 "x", target=at_least(5))]
    return rows


# ------------------------------------------------------------------------------------------------- serving


def client_session(server: LocalTorchServe) -> requests.Session:
    """A keep-alive session carrying the inference token, read once so no request pays for it."""
    session = requests.Session()
    session.headers.update(server.inference_headers())
    return session


def post(session: requests.Session, server: LocalTorchServe, model: str, payload) -> requests.Response:
    """One inference request (a dict goes as JSON, a str as a text/plain prompt), its body read whole."""
    url = f"{server.inference_url}/predictions/{model}"
    if isinstance(payload, str):
        response = session.post(url, data=payload.encode("utf-8"), headers={"Content-Type": "text/plain"},
                                timeout=REQUEST_TIMEOUT_S)
    else:
        response = session.post(url, json=payload, timeout=REQUEST_TIMEOUT_S)
    if response.status_code != 200:
        raise RuntimeError(f"{model} answered {response.status_code}: {response.text[:300]}")
    return response


def timed_post(session: requests.Session, server: LocalTorchServe, model: str, payload) -> float:
    started = time.perf_counter()
    post(session, server, model, payload)
    return time.perf_counter() - started


def measure_cold_start(work: Path, store: Path, plan: Plan) -> list[Row]:
    """Wall time of LocalTorchServe.start(): torchserve --start until our model has a READY worker."""
    samples = []
    for attempt in range(plan.cold_starts):
        progress(f"cold start {attempt + 1}/{plan.cold_starts}: starting TorchServe with {OURS}.mar")
        server = LocalTorchServe(work / "servers" / f"cold-start-{attempt}", store, {OURS: f"{OURS}.mar"},
                                 SERVER_OVERRIDES)
        try:
            started = time.perf_counter()
            server.start(timeout=300)
            samples.append(time.perf_counter() - started)
        finally:
            server.stop()
        progress(f"  READY after {samples[-1]:.1f} s")
    return [Row("cold start", f"LocalTorchServe.start() to a READY worker ({OURS}.mar)", median(samples), "s",
                len(samples), samples=samples)]


def overhead_target(side: int, steps: int, output_format: str) -> Optional[Target]:
    limit = OVERHEAD_TARGETS.get((side, steps), {}).get(output_format)
    return None if limit is None else at_most(limit)


def measure_overhead(server: LocalTorchServe, reference: InProcess, side: int, steps: int, runs: int) -> list[Row]:
    """Serving latency over in-process generation, for our array and png responses and the upstream baseline.

    The four measurements take turns within each round, so a slow spell of the machine hits all of them;
    one round before the measured ones absorbs first-call costs at this size in every process.
    """
    setting = f"{side}x{side}/{steps} steps"
    upstream = upstream_name(side, steps)
    candidates = {
        "in-process": lambda session: reference.time_generation(request_body(side, steps, "array")),
        "array": lambda session: timed_post(session, server, OURS, request_body(side, steps, "array")),
        "png": lambda session: timed_post(session, server, OURS, request_body(side, steps, "png")),
        "upstream": lambda session: timed_post(session, server, upstream, PROMPT),
    }
    samples = {name: [] for name in candidates}
    with client_session(server) as session:
        for round_number in range(runs + 1):
            label = "warm-up round" if round_number == 0 else f"round {round_number}/{runs}"
            progress(f"serving overhead {setting}: {label}")
            for name, measure in candidates.items():
                elapsed = measure(session)
                if round_number:
                    samples[name].append(elapsed)
    base = median(samples["in-process"])
    group = f"serving overhead {setting}"
    return [
        Row(group, "in-process generation", base, "s", runs, samples=samples["in-process"]),
        Row(group, "ours, png: latency / in-process", median(samples["png"]) / base, "x", runs,
            overhead_target(side, steps, "png"), samples=samples["png"]),
        Row(group, "ours, array: latency / in-process", median(samples["array"]) / base, "x", runs,
            overhead_target(side, steps, "array"), samples=samples["array"]),
        Row(group, "upstream baseline (array, indent=2): latency / in-process", median(samples["upstream"]) / base,
            "x", runs, samples=samples["upstream"]),
    ]


def load_round(server: LocalTorchServe, model: str, side: int, steps: int, clients: int,
               per_client: int) -> tuple[float, list[int]]:
    """``clients`` threads each send ``per_client`` requests in turn; returns images/s and the batch sizes seen.

    Responses use the ``json`` format, whose timings say how many images shared each pipeline call.
    """
    def client(index: int) -> list[int]:
        batch_images = []
        with client_session(server) as session:
            for number in range(per_client):
                body = request_body(side, steps, "json", seed=index * per_client + number)
                batch_images.append(post(session, server, model, body).json()["timings_ms"]["batch_images"])
        return batch_images

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        per_client_batches = list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - started
    return clients * per_client / elapsed, [size for batches in per_client_batches for size in batches]


def measure_load(server: LocalTorchServe, models: dict[str, str], setting: tuple[int, int],
                 plan: Plan) -> dict[str, tuple[list[float], list[int]]]:
    """Throughput rounds for each labelled model, taking turns round by round so drift hits all of them.

    One 1-step round per model first warms every worker up at this size. Returns, per label, the images/s
    of each round and the batch sizes seen.
    """
    side, steps = setting
    for label, model in models.items():
        progress(f"throughput {label}: warm-up round at {side}x{side}/1 step")
        load_round(server, model, side, 1, plan.clients, 1)
    results = {label: ([], []) for label in models}
    for round_number in range(plan.throughput_rounds):
        for label, model in models.items():
            progress(f"throughput {label}: round {round_number + 1}/{plan.throughput_rounds} ({plan.clients} "
                     f"clients x {plan.requests_per_client} requests at {side}x{side}/{steps} steps)")
            images_per_second, batches = load_round(server, model, side, steps, plan.clients,
                                                    plan.requests_per_client)
            results[label][0].append(images_per_second)
            results[label][1].extend(batches)
    return results


def scale_workers(server: LocalTorchServe, model: str, workers: int, timeout: float = 300) -> None:
    """Scale up or down through the management API and wait until the model has exactly that many workers,
    all READY."""
    response = requests.put(f"{server.management_url}/models/{model}",
                            params={"min_worker": workers, "synchronous": "true"},
                            headers=server.management_headers(), timeout=timeout)
    if response.status_code != 200:
        raise RuntimeError(f"scaling {model} to {workers} workers failed: {response.status_code} {response.text}")
    deadline = time.monotonic() + timeout
    while server.ready_workers(model) != workers or len(server.worker_pids(model)) != workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{model} did not get {workers} READY workers in {timeout:.0f} s")
        time.sleep(0.5)


def throughput_rows(group: str, names: tuple[str, str], samples: tuple[list[float], list[float]],
                    target: float) -> list[Row]:
    first, second = (median(values) for values in samples)
    return [Row(group, f"{names[0]}: images/s", first, "images/s", len(samples[0]), samples=samples[0]),
            Row(group, f"{names[1]}: images/s", second, "images/s", len(samples[1]), samples=samples[1]),
            Row(group, f"{names[1]} / {names[0]}", second / first, "x", len(samples[0]), at_least(target))]


def compare_batching(server: LocalTorchServe, plan: Plan) -> list[Row]:
    """Our model with batchSize 1 against the same archive built with batchSize 4, one worker each."""
    results = measure_load(server, {"batchSize 1": OURS, "batchSize 4": OURS_BATCHED}, plan.batch_setting, plan)
    (single, single_batches), (batched, batched_batches) = results["batchSize 1"], results["batchSize 4"]
    if max(single_batches) != 1:
        raise RuntimeError(f"the batchSize 1 model ran pipeline calls of {max(single_batches)} images")
    side, steps = plan.batch_setting
    group = f"throughput {side}x{side}/{steps} steps, {plan.clients} clients"
    rows = throughput_rows(group, ("batchSize 1", "batchSize 4"), (single, batched), 1.3)
    rows.append(Row(group, "batchSize 4: mean images per pipeline call", float(np.mean(batched_batches)), "images",
                    len(batched_batches)))
    return rows


def compare_workers(server: LocalTorchServe, plan: Plan) -> list[Row]:
    """Our model scaled between one and two workers through the management API, round by round.

    Taking turns (1, 2, 1, 2, ...) lets drift in the machine's speed, which on a shared VM moves single runs
    by 20%, hit both counts alike. Each scaling starts or stops a worker, so a 1-step round after it warms
    the new worker up and lets the survivors re-count their thread share before the measured round.
    """
    side, steps = plan.workers_setting
    samples = {1: [], 2: []}
    for round_number in range(plan.throughput_rounds):
        for workers in samples:
            progress(f"scaling {OURS} to {workers} worker(s), warm-up round at {side}x{side}/1 step")
            scale_workers(server, OURS, workers)
            load_round(server, OURS, side, 1, plan.clients, 1)
            progress(f"throughput {workers} worker(s): round {round_number + 1}/{plan.throughput_rounds} "
                     f"({plan.clients} clients x {plan.requests_per_client} requests at {side}x{side}/{steps} steps)")
            images_per_second, _ = load_round(server, OURS, side, steps, plan.clients, plan.requests_per_client)
            samples[workers].append(images_per_second)
    group = f"throughput {side}x{side}/{steps} steps, {plan.clients} clients"
    return throughput_rows(group, ("1 worker", "2 workers"), (samples[1], samples[2]), 1.5)


def measure_serving(work: Path, store: Path, reference: Optional[InProcess], plan: Plan,
                    sections: set[str]) -> list[Row]:
    """Overhead ratios and throughput on one server holding every model, so all share one server config.

    Idle workers of the other models only wait on their sockets. Batching is compared before scaling, so
    our model still has one worker then, like the batchSize-4 model.
    """
    names = [OURS]
    if "batching" in sections:
        names.append(OURS_BATCHED)
    if "overhead" in sections:
        names += [upstream_name(side, steps) for side, steps, _ in plan.latency]
    models = {name: f"{name}.mar" for name in names}
    progress(f"starting TorchServe with {', '.join(models)}")
    server = LocalTorchServe(work / "servers" / "serving", store, models, SERVER_OVERRIDES)
    try:
        server.start(timeout=600)
        rows = []
        if "overhead" in sections:
            for side, steps, runs in plan.latency:
                rows += measure_overhead(server, reference, side, steps, runs)
        batching = compare_batching(server, plan) if "batching" in sections else []
        if "workers" in sections:
            rows += compare_workers(server, plan)
        rows += batching
    finally:
        progress("stopping TorchServe")
        server.stop()
    return rows


# ------------------------------------------------------------------------------------------- build time


def make_large_pipeline(pipeline: Path, folder: Path, size: int) -> None:
    """The tiny pipeline plus random bytes in unet/padding.safetensors, ``size`` bytes in all.

    Random bytes do not compress, like real weights, so zip cannot shortcut them.
    """
    shutil.copytree(pipeline, folder)
    remaining = size - folder_size(folder)
    chunk = 64 * 2**20
    with open(folder / "unet" / "padding.safetensors", "wb") as padding:
        while remaining > 0:
            padding.write(os.urandom(min(chunk, remaining)))
            remaining -= chunk


def folder_size(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def measure_build(work: Path, pipeline: Path, plan: Plan) -> list[Row]:
    """build_mar.sh --model-dir time and output size, zip against no-archive, alternating which goes first."""
    folder = work / "large-pipeline"
    progress(f"build: writing a {plan.build_bytes / 1e6:,.0f} MB pipeline folder of random weights")
    make_large_pipeline(pipeline, folder, plan.build_bytes)
    samples = {"zip": [], "no-archive": []}
    sizes = {}
    output = work / "large-build"
    for run in range(plan.build_runs):
        formats = list(samples) if run % 2 == 0 else list(reversed(samples))
        for archive_format in formats:
            progress(f"build: {archive_format} {run + 1}/{plan.build_runs}")
            shutil.rmtree(output, ignore_errors=True)
            samples[archive_format].append(build_mar(
                work, f"build-large-{archive_format}-{run}", "--model-dir", folder, "--archive-format", archive_format,
                "--export-path", output, "--work-dir", work / "scratch", "--name", "large"))
            sizes[archive_format] = folder_size(output)
            shutil.rmtree(output)
    shutil.rmtree(folder)
    group = f"build_mar.sh, {plan.build_bytes / 1e6:,.0f} MB pipeline"
    rows = []
    for archive_format, values in samples.items():
        rows += [Row(group, f"{archive_format}: time", median(values), "s", len(values), samples=values),
                 Row(group, f"{archive_format}: output size", sizes[archive_format], "bytes")]
    rows.append(Row(group, "zip time / no-archive time", median(samples["zip"]) / median(samples["no-archive"]),
                    "x", plan.build_runs, at_least(5)))
    return rows


# ------------------------------------------------------------------------------------------------- main


def quiet_libraries() -> None:
    """Progress bars and warnings of this process would drown the benchmark's own progress lines."""
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def run(plan: Plan, work: Path, sections: set[str]) -> list[Row]:
    """The chosen measurements; rows come back in the order of the module docstring. Encoding and cold start
    run first, while no other server is up."""
    quiet_libraries()
    pipeline = work / "tiny-sd1"
    progress(f"building the tiny random-weight pipeline in {pipeline}")
    build_tiny_pipeline(pipeline)
    store = build_archives(work, pipeline, plan, sections)
    reference = None
    if sections & {"overhead", "encoding"}:
        progress("loading the in-process reference pipeline")
        reference = InProcess(pipeline, work / "in-process-model")
    encoding = measure_encoding(reference, plan) if "encoding" in sections else []
    cold_start = measure_cold_start(work, store, plan) if "cold-start" in sections else []
    serving = (measure_serving(work, store, reference, plan, sections)
               if sections & {"overhead", "batching", "workers"} else [])
    build = measure_build(work, pipeline, plan) if "build" in sections else []
    return serving + encoding + cold_start + build


def environment_summary() -> dict:
    from importlib.metadata import version

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cores": available_cores(),
        "torch_threads_in_process": torch.get_num_threads(),
        "versions": {package: version(package) for package in ("torch", "torchserve", "diffusers", "transformers")},
    }


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    plan = QUICK if arguments.quick else FULL
    sections = set(arguments.only or SECTIONS)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    progress(f"{plan.mode} mode on {available_cores()} cores; results go to {arguments.output}")
    if arguments.work_dir:
        arguments.work_dir.mkdir(parents=True, exist_ok=True)
        rows = run(plan, arguments.work_dir.resolve(), sections)
    else:
        with tempfile.TemporaryDirectory(prefix="sd-bench-") as work:
            rows = run(plan, Path(work), sections)
    duration = time.monotonic() - STARTED
    print()
    print(markdown_table(rows))
    print()
    write_json(arguments.output, rows, {"mode": plan.mode, "started_at": started_at, "duration_s": round(duration, 1),
                                        "plan": asdict(plan), "sections": sorted(sections),
                                        "environment": environment_summary()})
    progress(f"done in {duration:.0f} s; wrote {arguments.output}")


if __name__ == "__main__":
    main()
