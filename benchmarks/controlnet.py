#!/usr/bin/env python3
"""The cost of a ControlNet: a request with one (and with two) against the same request without, as ratios.

    python benchmarks/controlnet.py            # 256x256, 10 steps, 3 rounds, SD 1 (a few minutes on 2 cores)
    python benchmarks/controlnet.py --quick    # 128x128, 4 steps, 2 rounds
    python benchmarks/controlnet.py --family sdxl

Measured in this process through the generation engine the server runs (the HTTP and encoding costs are the
same with or without a ControlNet, so they would only blur the ratio). The pipeline is the tiny random one of
the family and the ControlNet is made from its own UNet with ``ControlNetModel.from_unet``, so it has the
real proportion to its UNet: the UNet's down and middle blocks again, run at every step. Each round runs the
variants in turn with the same seed, so a slow spell of the machine hits all of them. The canny row is the
server-side edge detection of one control image at the same size.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.report import Row, markdown_table, median, write_json  # noqa: E402
from benchmarks.run import progress  # noqa: E402


def measure(work: Path, family: str, side: int, steps: int, rounds: int) -> list[Row]:
    import base64
    import io

    import torch
    from PIL import Image

    from builder.tiny_controlnets import build_tiny_controlnet
    from builder.tiny_pipeline import build_tiny_pipeline
    from handler.core.controlnets import canny_edges
    from handler.core.settings import HandlerSettings
    from handler.model.controlnets import CONTROLNET_FOLDER
    from handler.service import build_service

    progress(f"building the tiny {family} pipeline and two ControlNets from its denoiser")
    build_tiny_pipeline(work / "pipeline", family)
    for seed, name in enumerate(("one", "two"), start=1):
        build_tiny_controlnet(work / "pipeline", work / CONTROLNET_FOLDER / name, seed=seed)
    service = build_service(work, HandlerSettings(device="cpu"))  # packed as build_mar.sh packs them
    engine, contract = service.engine, service.contract
    photo = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    base = {"prompt": "a photo of an astronaut riding a horse", "seed": 0, "width": side, "height": side,
            "num_inference_steps": steps}
    variants = {
        "without a ControlNet": base,
        "one ControlNet": {**base, "controlnet": "one", "control_image": encoded},
        "two ControlNets": {**base, "controlnet": ["one", "two"], "control_image": [encoded, encoded]},
    }
    requests = {name: contract.parse(body) for name, body in variants.items()}
    samples = {name: [] for name in variants}
    for round_number in range(rounds + 1):
        label = "warm-up round" if round_number == 0 else f"round {round_number}/{rounds}"
        progress(f"{side}x{side}/{steps} steps: {label}")
        for name, request in requests.items():
            started = time.perf_counter()
            with torch.inference_mode():
                (outcome,) = engine.generate([request])
            if not hasattr(outcome, "images"):
                raise RuntimeError(f"{name} failed: {outcome}")
            if round_number:
                samples[name].append(time.perf_counter() - started)
    canny = []
    image = Image.fromarray(photo)
    for _ in range(20):
        started = time.perf_counter()
        canny_edges(image, 100, 200)
        canny.append(time.perf_counter() - started)
    group = f"controlnet {family} {side}x{side}/{steps} steps, in-process"
    plain = median(samples["without a ControlNet"])
    rows = [Row(group, "without a ControlNet: latency", plain, "s", rounds, samples=samples["without a ControlNet"])]
    for name in list(variants)[1:]:
        rows.append(Row(group, f"{name}: latency / without", median(samples[name]) / plain, "x", rounds,
                        samples=samples[name]))
    rows.append(Row(group, "canny preprocessing of one control image", median(canny) * 1000, "ms", len(canny),
                    samples=canny))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128x128, 4 steps, 2 rounds: to check the script")
    parser.add_argument("--family", choices=("sd1", "sdxl", "flux"), default="sd1")
    parser.add_argument("--output", type=Path,
                        help="the JSON results (default: benchmarks/results/controlnet-FAMILY.json)")
    arguments = parser.parse_args(argv)
    side, steps, rounds = (128, 4, 2) if arguments.quick else (256, 10, 3)
    output = arguments.output or REPO_ROOT / "benchmarks" / "results" / f"controlnet-{arguments.family}.json"
    with tempfile.TemporaryDirectory(prefix="sd-controlnet-bench-") as folder:
        rows = measure(Path(folder), arguments.family, side, steps, rounds)
    print()
    print(markdown_table(rows))
    write_json(output, rows, {"mode": "quick" if arguments.quick else "full", "family": arguments.family,
                              "side": side, "steps": steps, "rounds": rounds})
    progress(f"wrote {output}")


if __name__ == "__main__":
    main()
