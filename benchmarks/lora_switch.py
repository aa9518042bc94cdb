#!/usr/bin/env python3
"""The cost of switching LoRAs between consecutive requests: unfused, fused and hot-swapped, as ratios.

    python benchmarks/lora_switch.py            # 512x512, 10 steps, 8 requests per way (about 4 minutes on 2 cores)
    python benchmarks/lora_switch.py --quick    # 256x256, 4 steps, 4 requests per way
    python benchmarks/lora_switch.py --compile  # also hot-swapping into a torch.compile'd UNet (CPU: minutes)

In this process, on the tiny SD 1 pipeline with two tiny random LoRAs (builder/tiny_adapters.py, rank 16 on
every attention projection), every request switches to the other LoRA (a, b, a, b, ...), which is the worst
case for a server that serves many. Each way is timed as switch + generation, against the same generation
without LoRA (the ways take turns, request by request):

- unfused, resident: both adapters stay loaded (max_loaded_loras >= 2); a switch is ``set_adapters``;
- unfused, from disk: max_loaded_loras 1, so each switch deletes one adapter and loads the other;
- fused: each switch unfuses the previous LoRA from the weights and fuses the next (``fuse_lora``), so the
  generation runs without the LoRA layers' extra matrix products (not what the server does: fusing drifts);
- hot-swapped: one slot whose weights are replaced in place (``hotswap=True``), as with ``torch_compile``.

The serving layer adds the same constant to every way, so in-process ratios are the ones that matter. The
tiny UNet makes the LoRA layers' share of the work far larger than on a real model: read the ratios of the
unfused ways as upper bounds.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.report import Row, markdown_table, median, write_json  # noqa: E402

RANK = 16


def progress(message: str) -> None:
    print(f"[lora-bench] {message}", flush=True)


class FusingSwitcher:
    """Switch by fusing: the active LoRA's weights are merged into the base weights (benchmark only)."""

    def __init__(self, pipeline, files: dict):
        self.pipeline = pipeline
        self.files = dict(files)
        for name, path in files.items():
            pipeline.load_lora_weights(str(path), adapter_name=name)
        self.fused = None

    def short_hash(self, name: str) -> str:
        """The images' metadata names each LoRA's hash, as the served LoraAdapters do."""
        from handler.model.adapters import A1111_SHORT_HASH, addnet_hash

        return addnet_hash(self.files[name])[:A1111_SHORT_HASH]

    def activate(self, selection) -> None:
        (name, scale), = selection
        if self.fused is not None:
            self.pipeline.unfuse_lora()
        self.pipeline.set_adapters([name], [scale])
        self.pipeline.fuse_lora(adapter_names=[name], lora_scale=1.0)
        self.pipeline.disable_lora()  # the fused weights hold the LoRA; the layers must not add it again
        self.fused = name


def ways(pipeline_dir: Path, files: dict, device: str, compile_too: bool):
    """(name, a function building its engine) for every way, each on a freshly loaded pipeline."""
    import torch

    from handler.core.generation import GenerationEngine
    from handler.core.settings import HandlerSettings
    from handler.model.adapters import LoraAdapters, serve_loras
    from handler.model.device import Placement
    from handler.model.loading import load_pipeline, optimize_pipeline, read_pipeline

    dtype = torch.float16 if device == "cuda" else torch.float32
    placement = Placement(device, dtype)

    def plain(max_loaded=None, fusing=False):
        pipeline = load_pipeline(pipeline_dir, placement)
        if fusing:
            return GenerationEngine(pipeline, 10**9, loras=FusingSwitcher(pipeline, files))
        loras = LoraAdapters(pipeline, files, max_loaded) if max_loaded else None
        return GenerationEngine(pipeline, 10**9, loras=loras)

    def hot_swapped(compiled: bool):
        settings = HandlerSettings(max_loras=1, max_loaded_loras=2, torch_compile=compiled)
        pipeline = read_pipeline(pipeline_dir, placement, settings)
        loras = serve_loras(pipeline, files, 1, 2, hotswap=True)  # the slots must exist before compiling
        optimize_pipeline(pipeline, placement, settings)
        return GenerationEngine(pipeline, 10**9, loras=loras)

    found = [("no LoRA", lambda: plain()), ("unfused, resident", lambda: plain(max_loaded=2)),
             ("unfused, from disk", lambda: plain(max_loaded=1)), ("fused", lambda: plain(fusing=True)),
             ("hot-swapped", lambda: hot_swapped(False))]
    if compile_too:
        found.append(("hot-swapped, torch.compile", lambda: hot_swapped(True)))
    return found


def timed_request(engine, side: int, steps: int, number: int, with_lora: bool) -> tuple[float, float]:
    """(latency, switch) of request ``number``: it switches to LoRA a or b, alternately, then generates."""
    from handler.core.contract import GenerationRequest

    loras = ((("a", "b")[number % 2], 1.0),) if with_lora else ()
    request = GenerationRequest(prompt="a cat", negative_prompt=None, num_inference_steps=steps, guidance_scale=7.5,
                                width=side, height=side, seeds=(number,), scheduler=None, loras=loras)
    started = time.perf_counter()
    if engine.loras is not None:
        engine.loras.activate(loras)
    switched = time.perf_counter()
    (result,) = engine.generate([request])  # the selection is active: generate() switches nothing more
    if not hasattr(result, "images"):
        raise RuntimeError(f"generation failed: {result}")
    return time.perf_counter() - started, switched - started


def measure(engines: dict, side: int, steps: int, requests: int) -> dict[str, tuple[list[float], list[float]]]:
    """Every way's latencies and switch times; the ways take turns request by request, so a slow spell of a
    shared machine hits all of them alike. Request 0 of each way is a warm-up (and, compiled, the compile)."""
    samples = {name: ([], []) for name in engines}
    for number in range(requests + 1):
        progress(f"{'warm-up round' if number == 0 else f'round {number}/{requests}'}")
        for name, engine in engines.items():
            latency, switch = timed_request(engine, side, steps, number, with_lora=name != "no LoRA")
            if number:
                samples[name][0].append(latency)
                samples[name][1].append(switch)
    return samples


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256x256, 4 steps, 4 requests per way")
    parser.add_argument("--compile", action="store_true", help="also hot-swap into a torch.compile'd UNet")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "lora_switch.json")
    arguments = parser.parse_args(argv)
    side, steps, requests = (256, 4, 4) if arguments.quick else (512, 10, 8)

    from builder.tiny_adapters import make_tiny_lora
    from builder.tiny_pipeline import build_tiny_pipeline

    group = f"LoRA switch every request, {side}x{side}/{steps} steps, rank {RANK}, {arguments.device}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="sd-lora-bench-") as folder:
        work = Path(folder)
        progress("building the tiny SD 1 pipeline and two LoRAs")
        build_tiny_pipeline(work / "pipeline", "sd1")
        files = {name: make_tiny_lora(work / "pipeline", work / f"{name}.safetensors", seed=seed, rank=RANK)
                 for seed, name in enumerate(("a", "b"), start=1)}
        engines = {}
        for name, build in ways(work / "pipeline", files, arguments.device, arguments.compile):
            progress(f"loading the pipeline for: {name}")
            engines[name] = build()
        samples = measure(engines, side, steps, requests)
    baseline = median(samples["no LoRA"][0])
    rows.append(Row(group, "no LoRA: request latency", baseline, "s", requests, samples=samples["no LoRA"][0]))
    for name, (latencies, switches) in samples.items():
        if name != "no LoRA":
            rows.append(Row(group, f"{name}: switch", median(switches) * 1000, "ms", requests, samples=switches))
            rows.append(Row(group, f"{name}: request with a switch / no LoRA", median(latencies) / baseline, "x",
                            requests, samples=latencies))
    print()
    print(markdown_table(rows))
    write_json(arguments.output, rows, {"mode": "quick" if arguments.quick else "full", "side": side,
                                        "steps": steps, "requests": requests, "rank": RANK,
                                        "device": arguments.device})
    progress(f"wrote {arguments.output}")


if __name__ == "__main__":
    main()
