#!/usr/bin/env python3
"""The cost of streaming progress and of previews, as ratios against the same generation without them.

    python benchmarks/streaming.py            # 768x768, 30 steps, 5 rounds (about 5 minutes on 2 cores)
    python benchmarks/streaming.py --quick    # 256x256, 10 steps, 2 rounds

One TorchServe (loopback, the shipped settings, one worker) serves the tiny .mar built by build_mar.sh. Each
round sends the same request (same seed) four ways, in turn, so a slow spell of the machine hits all of them:
a plain PNG response, a stream without previews, a stream with a preview every 5 steps, and one with a preview
on every step. The client reads every line. The table gives median latencies and their ratios to the plain
request. On 2 shared cores those latencies move by several percent between rounds, so the preview's own cost
is also measured in this process, where it can be isolated: the time of one preview (latent-to-RGB map and
JPEG) against the time of one denoising step at the same size. The target from the streaming issue is
previews under 5% of the generation at 768x768.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.report import Row, at_most, markdown_table, median, write_json  # noqa: E402
from benchmarks.run import build_mar, progress  # noqa: E402
from harness.local_server import LocalTorchServe  # noqa: E402

MODEL = "stable_diffusion"
VARIANTS = {
    "plain png": {},
    "stream": {"stream": True},
    "stream, preview every 5 steps": {"stream": True, "preview_every": 5},
    "stream, preview every step": {"stream": True, "preview_every": 1},
}


def timed(session: requests.Session, url: str, body: dict) -> float:
    """Seconds until the whole answer (every line of a stream) has been read; fails on an error."""
    started = time.perf_counter()
    with session.post(url, json=body, stream=True, timeout=900) as response:
        chunks = list(response.iter_lines()) if body.get("stream") else [response.content]
    elapsed = time.perf_counter() - started
    if response.status_code != 200 or (body.get("stream") and json.loads(chunks[-1])["event"] != "result"):
        raise RuntimeError(f"request failed: {response.status_code} {chunks[-1][:300]!r}")
    return elapsed


def measure(server: LocalTorchServe, side: int, steps: int, rounds: int) -> list[Row]:
    url = f"{server.inference_url}/predictions/{MODEL}"
    base = {"prompt": "a photo of an astronaut riding a horse on mars", "seed": 0, "width": side, "height": side,
            "num_inference_steps": steps, "output_format": "png"}
    samples = {name: [] for name in VARIANTS}
    with requests.Session() as session:
        session.headers.update(server.inference_headers())
        for round_number in range(rounds + 1):
            progress(f"{side}x{side}/{steps} steps: {'warm-up round' if round_number == 0 else f'round {round_number}/{rounds}'}")
            for name, extra in VARIANTS.items():
                elapsed = timed(session, url, {**base, **extra})
                if round_number:
                    samples[name].append(elapsed)
    group = f"streaming {side}x{side}/{steps} steps"
    plain = median(samples["plain png"])
    rows = [Row(group, "plain png: latency", plain, "s", rounds, samples=samples["plain png"])]
    for name in list(VARIANTS)[1:]:
        target = at_most(1.05) if side == 768 and "preview" in name else None
        rows.append(Row(group, f"{name}: latency / plain", median(samples[name]) / plain, "x", rounds, target,
                        samples=samples[name]))
    return rows


def measure_preview_cost(pipeline_dir: Path, side: int, steps: int, runs: int = 50) -> list[Row]:
    """One preview's time over one denoising step's time, both in this process at ``side`` x ``side``."""
    import torch

    from handler.core.previews import LatentPreviewer, preview_jpeg
    from handler.core.settings import HandlerSettings
    from handler.service import build_service

    progress(f"in-process: timing denoising steps and previews at {side}x{side}")
    service = build_service(pipeline_dir, HandlerSettings(device="cpu"))
    engine, pipeline = service.engine, service.engine.pipeline
    request = service.contract.parse({"prompt": "a cat", "seed": 0, "width": side, "height": side,
                                      "num_inference_steps": steps})
    stamps = []
    engine.generate([request], on_progress=lambda position, step: stamps.append(time.perf_counter()))
    step_seconds = median([later - earlier for earlier, later in zip(stamps[1:], stamps[2:])])
    previewer = LatentPreviewer(pipeline)
    latents = torch.randn((1, pipeline.unet.config.in_channels, side // 8, side // 8))
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        preview_jpeg(previewer.preview(latents, 0, side, side))
        samples.append(time.perf_counter() - started)
    group = f"preview cost {side}x{side}, in-process"
    return [Row(group, "one denoising step", step_seconds * 1000, "ms", len(stamps) - 2),
            Row(group, "one preview (map + JPEG)", median(samples) * 1000, "ms", runs, samples=samples),
            Row(group, "preview every step: preview / step", median(samples) / step_seconds * 100, "%", runs,
                at_most(5) if side == 768 else None)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256x256, 10 steps, 2 rounds: to check the script")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "streaming.json")
    arguments = parser.parse_args(argv)
    side, steps, rounds = (256, 10, 2) if arguments.quick else (768, 30, 5)
    with tempfile.TemporaryDirectory(prefix="sd-stream-bench-") as folder:
        work = Path(folder)
        progress("building the tiny .mar with build_mar.sh")
        build_mar(work, "build", "--tiny", "--export-path", work / "store", "--work-dir", work / "scratch")
        server = LocalTorchServe(work / "server", work / "store", {MODEL: f"{MODEL}.mar"},
                                 {"disable_system_metrics": "true"})
        progress("starting TorchServe")
        server.start(timeout=300)
        try:
            rows = measure(server, side, steps, rounds)
        finally:
            progress("stopping TorchServe")
            server.stop()
        rows += measure_preview_cost(work / "scratch" / "tiny-sd1", side, steps)
    print()
    print(markdown_table(rows))
    write_json(arguments.output, rows, {"mode": "quick" if arguments.quick else "full", "side": side,
                                        "steps": steps, "rounds": rounds})
    progress(f"wrote {arguments.output}")


if __name__ == "__main__":
    main()
