#!/usr/bin/env python3
"""The cost of reading prompts (a1111, compel, long prompts) and of translating them, against generation.

    python benchmarks/prompts.py            # 512x512, 20 steps, 3 rounds (about 2 minutes on 2 idle cores)
    python benchmarks/prompts.py --quick    # 256x256, 4 steps, 2 rounds

In process, on the tiny SD 1 pipeline (builder/tiny_pipeline.py) and the tiny MarianMT translator
(builder/tiny_translator.py). A syntax changes only how the prompts are encoded (the denoising is the same
call on the same embeddings), so its cost is measured there: diffusers' ``encode_prompt`` against
``PromptEncoder.length_key`` plus ``arguments`` (as the engine runs them; compel encodes twice) for a short
prompt (one chunk) and a long one (two to three chunks), interleaved run by run, and the difference is set
against a plain generation's median seconds. End-to-end ratios of whole generations would drown that
difference in the noise of 2 shared cores. The tiny text encoder is small next to a real CLIP (5 layers of
width 32 against 12 of 768), and so is the tiny UNet: read the shares as orders of magnitude. The target:
a1111 adds at most 5% to a 512x512 generation.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.report import Row, at_most, markdown_table, median, write_json  # noqa: E402
from benchmarks.run import progress  # noqa: E402

SHORT = "a photo of an astronaut riding a horse on mars"
LONG = ("a (photo:1.2) of an astronaut riding a horse on mars, red desert, dust storm, dramatic clouds, "
        "golden hour, cinematic lighting, film grain, 35mm, highly detailed, sharp focus, [blurry], wide angle, "
        "epic scale, volumetric light, rim light, octane render, trending on artstation")
NEGATIVE = "(blurry:1.3), low quality, text, watermark"
SYNTAXES = ("plain", "a1111", "compel")


def seconds(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def measure_generation(engine, side: int, steps: int, rounds: int) -> list[float]:
    """Seconds of one plain generation (a prompt and a negative prompt), per round after a warm-up."""
    from handler.core.requests import GenerationRequest

    request = GenerationRequest(prompt=LONG, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                                width=side, height=side, seeds=(0,), scheduler=None)
    samples = []
    for round_number in range(rounds + 1):
        elapsed = seconds(lambda: engine.generate([request]))
        if round_number:
            samples.append(elapsed)
        progress(f"generation {round_number}/{rounds}: {elapsed:.2f} s")
    return samples


def measure_encoding(pipeline, runs: int, generation: float, side: int, steps: int) -> list[Row]:
    """Encoding times, interleaved per run, and what each syntax adds to a generation of ``generation`` s."""
    from handler.core.prompts import prompt_encoder_for

    encoders = {syntax: prompt_encoder_for(pipeline, syntax) for syntax in SYNTAXES[1:]}
    rows = []
    for name, prompt in (("short", SHORT), ("long", LONG)):
        samples = {syntax: [] for syntax in SYNTAXES}
        for _ in range(runs):
            with torch.no_grad():
                samples["plain"].append(seconds(lambda: pipeline.encode_prompt(
                    prompt, "cpu", 1, True, negative_prompt=NEGATIVE)))
                for syntax, encoder in encoders.items():  # as the engine runs it: the batch key, then the call
                    samples[syntax].append(seconds(lambda: (encoder.length_key(prompt, NEGATIVE),
                                                            encoder.arguments([prompt], [NEGATIVE]))))
        group = f"encoding a prompt and its negative, {name}"
        for syntax, values in samples.items():
            rows.append(Row(group, syntax, median(values) * 1000, "ms", runs, samples=values))
        for syntax in SYNTAXES[1:]:
            extra = (median(samples[syntax]) - median(samples["plain"])) / generation * 100
            target = at_most(5) if syntax == "a1111" and side >= 512 else None
            rows.append(Row(group, f"{syntax}: added to a {side}x{side} {steps}-step generation", extra, "%", runs,
                            target))
    return rows


def measure_translation(folder: Path, runs: int) -> list[Row]:
    from handler.model.translation import PromptTranslator

    translator = PromptTranslator(folder, "auto")
    texts = [f"一只红色的狐狸在雪地里 {index}" for index in range(runs)]
    fresh = [seconds(lambda text=text: translator.translate(text)) for text in texts]
    cached = [seconds(lambda text=text: translator.translate(text)) for text in texts]
    group = "translation (tiny MarianMT, 12 pieces out)"
    return [Row(group, "a new prompt", median(fresh) * 1000, "ms", runs, samples=fresh),
            Row(group, "a prompt seen before (cache)", median(cached) * 1000, "ms", runs, samples=cached)]


def main(argv=None) -> None:
    from builder.tiny_pipeline import build_tiny_pipeline
    from builder.tiny_translator import build_tiny_translator
    from handler.core.settings import HandlerSettings
    from handler.service import build_service

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256x256, 4 steps, 2 rounds: to check the script")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "prompts.json")
    arguments = parser.parse_args(argv)
    side, steps, rounds = (256, 4, 2) if arguments.quick else (512, 20, 3)
    with tempfile.TemporaryDirectory(prefix="sd-prompts-bench-") as folder:
        progress("building the tiny SD 1 pipeline and the tiny translator")
        build_tiny_pipeline(Path(folder) / "pipeline")
        translator = build_tiny_translator(Path(folder) / "translator")
        engine = build_service(Path(folder) / "pipeline", HandlerSettings(device="cpu")).engine  # as served
        pipeline = engine.pipeline
        generation = measure_generation(engine, side, steps, rounds)
        rows = [Row(f"generation {side}x{side}, {steps} steps", "plain, long prompt", median(generation), "s",
                    rounds, samples=generation)]
        rows += measure_encoding(pipeline, 20, median(generation), side, steps)
        rows += measure_translation(translator, 20)
    print()
    print(markdown_table(rows))
    write_json(arguments.output, rows, {"mode": "quick" if arguments.quick else "full", "side": side,
                                        "steps": steps, "rounds": rounds, "threads": torch.get_num_threads()})
    progress(f"wrote {arguments.output}")


if __name__ == "__main__":
    main()
