#!/usr/bin/env python3
"""Build time of a single-file checkpoint (``--checkpoint --config-from``) against the same model as a folder
(``--model-dir``), as a ratio, per family.

    python benchmarks/checkpoint_build.py                  # tiny sd1, sd2-v and sdxl, 3 builds each way
    python benchmarks/checkpoint_build.py --repeats 1      # one build each way
    python benchmarks/checkpoint_build.py --full-size sd1 --repeats 1   # a random-weight SD 1.5 at full size
                                                            # (fp16, 2 GB; builder/full_size.py), about 8 GB RAM

Each family's tiny pipeline is written once as a folder and once as an original-layout checkpoint
(builder/original_layout.py); both are archived by build_mar.sh (no-archive, so zipping does not dominate), the
ways taking turns. The checkpoint way adds the conversion (read the header, convert, save the folder) to the
same archiving. Measured on tiny pipelines of a few MB: the ratio mostly shows the fixed cost of importing
diffusers and building the pipeline objects, not what a 2-7 GB checkpoint costs; at full size the conversion
reads and writes the weights once more, which ``--full-size`` measures.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.report import Row, markdown_table, median, write_json  # noqa: E402

FAMILIES = ("sd1", "sd2-v", "sdxl")


def progress(message: str) -> None:
    print(f"[checkpoint-bench] {message}", flush=True)


def timed_build(*arguments) -> float:
    started = time.perf_counter()
    subprocess.run([str(REPO_ROOT / "build_mar.sh"), *map(str, arguments), "--archive-format", "no-archive",
                    "--force"], check=True, capture_output=True,
                   env={**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - started


def make_pipeline(work: Path, family: str, full_size: bool):
    """The family's pipeline saved to ``work/family`` and loaded back (tiny, or full size in float16)."""
    if not full_size:
        from builder.tiny_pipeline import build_tiny_pipeline

        return build_tiny_pipeline(work / family, family)
    import torch
    from diffusers import DiffusionPipeline

    from builder.full_size import build_full_size_pipeline

    build_full_size_pipeline(work / family, family, work / "downloads", progress)
    return DiffusionPipeline.from_pretrained(work / family, local_files_only=True, torch_dtype=torch.float16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-size", choices=FAMILIES, help="measure this family at full size instead (fp16)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "checkpoint_build.json")
    arguments = parser.parse_args()
    from builder.original_layout import write_original_checkpoint

    rows = []
    with tempfile.TemporaryDirectory(prefix="sd-checkpoint-bench-") as folder:
        work = Path(folder)
        for family in [arguments.full_size] if arguments.full_size else FAMILIES:
            pipeline = make_pipeline(work, family, arguments.full_size is not None)
            checkpoint = write_original_checkpoint(pipeline, family, work / f"{family}.safetensors")
            del pipeline
            common = ["--export-path", work / "store", "--work-dir", work / "scratch"]
            folder_times, checkpoint_times = [], []
            for repeat in range(arguments.repeats):
                progress(f"{family}: build {repeat + 1}/{arguments.repeats} each way")
                folder_times.append(timed_build("--model-dir", work / family, "--name", "folder", *common))
                checkpoint_times.append(timed_build("--checkpoint", checkpoint, "--config-from", work / family,
                                                    "--name", "checkpoint", *common))
            group = f"{'full-size' if arguments.full_size else 'tiny'} {family}"
            rows.append(Row(group, "--model-dir build", median(folder_times), "s", arguments.repeats,
                            samples=folder_times))
            rows.append(Row(group, "--checkpoint build", median(checkpoint_times), "s", arguments.repeats,
                            samples=checkpoint_times))
            rows.append(Row(group, "--checkpoint / --model-dir", median(checkpoint_times) / median(folder_times),
                            "x", arguments.repeats))
    print()
    print(markdown_table(rows))
    write_json(arguments.output, rows, {"repeats": arguments.repeats,
                                        "model_size": "full" if arguments.full_size else "tiny"})
    progress(f"wrote {arguments.output}")


if __name__ == "__main__":
    main()
