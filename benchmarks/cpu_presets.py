#!/usr/bin/env python3
"""CPU presets against float32 eager, in one run: bfloat16, and torch.compile with the OpenVINO backend.

    python benchmarks/cpu_presets.py            # tiny sd1 at 768x768/2 steps and 512x512/20 steps
    python benchmarks/cpu_presets.py --quick    # 128x128/2 steps only, to check the script

Needs the optional ``openvino`` package for its preset (``pip install -c constraints.txt -e ".[openvino]"``);
without it that preset is reported as failed. Each preset is loaded, warmed up at the size (compiling
there), then timed; the table gives the median latency, its ratio to float32 eager at the same size, and the
largest pixel difference from the float32 eager image (same seed).

What the tiny pipeline can tell: the relative cost of the per-step work outside big matmuls and convolutions
(Python, the scheduler, small kernels), and whether a preset changes the images. What it cannot: a real
model's speed-up, which is dominated by large convolutions and attention that bfloat16 (AMX / AVX512-BF16)
and OpenVINO's kernels accelerate far more than a 32-channel network shows.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.presets import largest_difference, prepare, run_once  # noqa: E402
from benchmarks.report import Row, markdown_table, median, write_json  # noqa: E402
from handler.model.device import Placement  # noqa: E402

STARTED = time.monotonic()
PRESETS = {
    "float32 eager": (torch.float32, {}),
    "bfloat16 eager": (torch.bfloat16, {}),
    "float32 openvino": (torch.float32, {"torch_compile": True, "compile_backend": "openvino"}),
}


def progress(message: str) -> None:
    print(f"[cpu_presets {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(flag for flag in flags if "bf16" in flag or flag.startswith("amx"))


def compare_at(folder: Path, side: int, steps: int, runs: int) -> list[Row]:
    """Every preset at one size: prepared (loaded, warmed up) first, then timed in turns, round by round, so
    that a slow spell of a shared machine hits all of them alike."""
    group = f"{side}x{side}, {steps} steps"
    prepared, rows = {}, []
    for name, (dtype, values) in PRESETS.items():
        progress(f"{group}: preparing {name}")
        try:
            prepared[name] = prepare(folder, Placement("cpu", dtype), values, side, side)
        except Exception as error:  # reported, so the other presets still run
            progress(f"{group}: {name} failed: {type(error).__name__}: {str(error)[:300]}")
            rows.append(Row(group, f"{name}: failed ({type(error).__name__})", 1, "", n=0))
    for round_number in range(runs):
        progress(f"{group}: round {round_number + 1}/{runs}")
        for measured in prepared.values():
            run_once(measured, side, side, steps)
    baseline = prepared["float32 eager"]
    for name, measured in prepared.items():
        latency = median(measured.seconds)
        rows[len(rows):] = [
            Row(group, f"{name}: latency", latency, "s", n=runs, samples=measured.seconds),
            Row(group, f"{name}: speed-up vs float32 eager", median(baseline.seconds) / latency, "x", n=runs),
            Row(group, f"{name}: load + warm-up", measured.load_seconds + measured.warmup_seconds, "s", n=1),
            Row(group, f"{name}: largest pixel difference vs float32 eager",
                largest_difference(measured.images, baseline.images), "levels", n=1),
        ]
    return rows


def main(argv=None) -> int:
    from builder.tiny_pipeline import build_tiny_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "cpu_presets.json")
    args = parser.parse_args(argv)
    sizes = [(128, 2)] if args.quick else [(768, 2), (512, 20)]
    runs = 1 if args.quick else args.runs
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "sd1"
        build_tiny_pipeline(folder, "sd1")
        for side, steps in sizes:
            rows += compare_at(folder, side, steps, runs)
    context = {"cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"\nCPU flags {context['cpu_flags']}, {context['threads']} threads\n")
    print(markdown_table(rows))
    write_json(args.output, rows, context)
    progress(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
