#!/usr/bin/env python3
"""GPU check: every family's tiny pipeline (and a real model folder if given) under each speed preset.

    python benchmarks/gpu_check.py                        # one GPU, about 5-8 minutes
    python benchmarks/gpu_check.py --model-folder /models/sdxl-base   # plus a real pipeline folder
    python benchmarks/gpu_check.py --dry-run              # CPU, 64x64, eager compile backend (CI runs it)

For each family and preset it reports the latency of one generation after warm-up, the graphs compiled
after warm-up (should be 0), the peak GPU memory, and the largest pixel difference against the same
generation in float32 eager on the CPU. Then the SDXL out-of-memory sequence: an out-of-memory error in the
decode (a real one on the GPU, from a memory cap; injected in the dry run), then a normal request, which must
succeed with the VAE back in float16. It prints a table and writes JSON.

The dry run exercises the same code on CPU in float32 with the ``eager`` torch.compile backend (Dynamo
traces and guards, no code generation), so the script cannot rot; its numbers say nothing about a GPU.
Tiny pipelines measure the handler's overheads and correctness, not a real model's speed: pass a real
model folder for that.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.presets import generation, largest_difference, measure  # noqa: E402
from benchmarks.report import Row, markdown_table, write_json  # noqa: E402
from builder.families import FAMILIES  # noqa: E402
from handler.core.failures import OUT_OF_MEMORY  # noqa: E402
from handler.model.device import BFLOAT16_PIPELINES, Placement  # noqa: E402

STARTED = time.monotonic()
CHECKED_FAMILIES = tuple(family for family in FAMILIES if family != "sd1-safety")  # same network as sd1
TRANSFORMER_FAMILIES = ("sd3", "flux")


def progress(message: str) -> None:
    print(f"[gpu_check {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def presets(family: str, dry_run: bool, fp8: bool) -> dict[str, dict]:
    """The presets to check for a family: handler settings by name."""
    backend = {"compile_backend": "eager"} if dry_run else {}
    chosen = {
        "eager": {},
        "compile": {"torch_compile": True, **backend},
        "compile+vae+fuse_qkv": {"torch_compile": True, "compile_vae": True, "fuse_qkv": True, **backend},
        "int8wo": {"quantization": "int8wo"},
    }
    if not dry_run:
        chosen["reduce-overhead"] = {"torch_compile": True, "compile_mode": "reduce-overhead"}
    if family in TRANSFORMER_FAMILIES:
        chosen["regional compile"] = {"torch_compile": True, "compile_repeated_blocks": True, **backend}
    if family == "flux":
        chosen["step cache 0.1"] = {"step_cache_threshold": 0.1}
    if fp8:
        chosen["fp8"] = {"quantization": "fp8"}
    return chosen


def check_family(name: str, folder: Path, args, placement: Placement, fp8: bool) -> list:
    side = args.size
    progress(f"{name}: CPU float32 reference at {side}x{side}, {args.steps} steps")
    reference = measure(folder, Placement("cpu", torch.float32), {}, side, side, args.steps, runs=1).images
    rows = []
    for preset, values in presets(name, args.dry_run, fp8).items():
        progress(f"{name}: {preset}")
        torch._dynamo.reset()  # each preset compiles afresh and counts its own graphs
        try:
            measured = measure(folder, placement, values, side, side, args.steps, args.runs)
        except Exception as error:  # a preset a family cannot take is reported, not fatal
            progress(f"{name}: {preset} failed: {type(error).__name__}: {error}")
            rows.append(Row(name, f"{preset}: failed ({type(error).__name__})", 1, "", n=0))
            continue
        rows += [
            Row(name, f"{preset}: latency", min(measured.seconds), "s", n=len(measured.seconds),
                samples=measured.seconds),
            Row(name, f"{preset}: warm-up", measured.warmup_seconds, "s", n=1),
            Row(name, f"{preset}: compiles after warm-up", measured.compiles_after_warmup, "graphs", n=1),
            Row(name, f"{preset}: largest pixel difference vs CPU float32", largest_difference(
                measured.images, reference), "levels", n=1),
        ]
        if measured.peak_memory_bytes:
            rows.append(Row(name, f"{preset}: peak memory", measured.peak_memory_bytes, "bytes", n=1))
    return rows


def out_of_memory_sequence(folder: Path, placement: Placement, dry_run: bool) -> list:
    """SDXL in float16: an out-of-memory error during the float32 decode, then a normal request."""
    progress("sdxl: out-of-memory in the decode, then a normal request")
    half = Placement(placement.device, torch.float16)
    engine = measure(folder, half, {}, 64, 64, 1, runs=1).engine
    vae = engine.pipeline.vae
    if dry_run:  # no allocation can be made to fail on CPU: raise what the CUDA allocator raises
        def out_of_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("injected by gpu_check --dry-run")
        vae.decode = out_of_memory
    else:  # cap this process's GPU memory just above what it holds, so a large decode cannot fit
        total = torch.cuda.get_device_properties(placement.device).total_memory
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 2**24) / total)
    with torch.inference_mode():
        side = 64 if dry_run else 1024
        failed = engine.generate([generation(side, side, 1, images=4)])[0]
        if dry_run:
            del vae.decode
        else:
            torch.cuda.set_per_process_memory_fraction(1.0)
        recovered = engine.generate([generation(64, 64, 1)])[0]
    return [
        Row("sdxl OOM", "first request answered out_of_memory", float(getattr(failed, "reason", "") == OUT_OF_MEMORY),
            "yes=1", n=1),
        Row("sdxl OOM", "next request succeeded", float(hasattr(recovered, "images")), "yes=1", n=1),
        Row("sdxl OOM", "VAE back in float16", float(vae.dtype == torch.float16), "yes=1", n=1),
    ]


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, 64x64, 1 step: check the script itself")
    parser.add_argument("--model-folder", type=Path, help="a real diffusers pipeline folder to check too")
    parser.add_argument("--families", nargs="*", default=list(CHECKED_FAMILIES), choices=CHECKED_FAMILIES)
    parser.add_argument("--size", type=int, default=512, help="image side (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per preset (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.size, args.steps, args.runs = 64, 1, 1
    return args


def main(argv=None) -> int:
    from builder.tiny_pipeline import build_tiny_pipeline
    from handler.model.pipeline_index import pipeline_class_name

    args = parse_arguments(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda:0"
    fp8 = not args.dry_run and torch.cuda.get_device_capability() >= (8, 9)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folders = {}
        for family in args.families:
            progress(f"building the tiny {family} pipeline")
            folders[family] = Path(scratch) / family
            build_tiny_pipeline(folders[family], family)
        if args.model_folder:
            folders[args.model_folder.name] = args.model_folder
        for name, folder in folders.items():
            pipeline_class = pipeline_class_name(folder)
            dtype = torch.float32 if args.dry_run else (
                torch.bfloat16 if pipeline_class in BFLOAT16_PIPELINES else torch.float16)
            rows += check_family(name, folder, args, Placement(device, dtype), fp8)
        if "sdxl" in folders:
            rows += out_of_memory_sequence(folders["sdxl"], Placement(device, torch.float32), args.dry_run)
    gpu = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    print(f"\n{gpu}, {args.size}x{args.size}, {args.steps} steps\n")
    print(markdown_table(rows))
    write_json(args.output, rows, {"device": gpu, "size": args.size, "steps": args.steps, "runs": args.runs,
                                   "torch": torch.__version__, "checked": list(folders)})
    progress(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
