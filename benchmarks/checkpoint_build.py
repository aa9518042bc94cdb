#!/usr/bin/env python3
"""Build time of a single-file checkpoint (``--checkpoint --config-from``) against the same model as a folder
(``--model-dir``), as a ratio, per family.

    python benchmarks/checkpoint_build.py                  # tiny sd1, sd2-v and sdxl, 3 builds each way
    python benchmarks/checkpoint_build.py --repeats 1      # one build each way

Each family's tiny pipeline is written once as a folder and once as an original-layout checkpoint
(builder/original_layout.py); both are archived by build_mar.sh (no-archive, so zipping does not dominate), the
ways taking turns. The checkpoint way adds the conversion (read the header, convert, save the folder) to the
same archiving. Measured on tiny pipelines of a few MB: the ratio mostly shows the fixed cost of importing
diffusers and building the pipeline objects, not what a 2-7 GB checkpoint costs; at full size the conversion
reads and writes the weights once more.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "checkpoint_build.json")
    arguments = parser.parse_args()
    from builder.original_layout import write_original_checkpoint
    from builder.tiny_pipeline import build_tiny_pipeline

    rows = []
    with tempfile.TemporaryDirectory(prefix="sd-checkpoint-bench-") as folder:
        work = Path(folder)
        for family in FAMILIES:
            pipeline = build_tiny_pipeline(work / family, family)
            checkpoint = write_original_checkpoint(pipeline, family, work / f"{family}.safetensors")
            common = ["--export-path", work / "store", "--work-dir", work / "scratch"]
            folder_times, checkpoint_times = [], []
            for repeat in range(arguments.repeats):
                progress(f"{family}: build {repeat + 1}/{arguments.repeats} each way")
                folder_times.append(timed_build("--model-dir", work / family, "--name", "folder", *common))
                checkpoint_times.append(timed_build("--checkpoint", checkpoint, "--config-from", work / family,
                                                    "--name", "checkpoint", *common))
            group = f"tiny {family}"
            rows.append(Row(group, "--model-dir build", median(folder_times), "s", arguments.repeats,
                            samples=folder_times))
            rows.append(Row(group, "--checkpoint build", median(checkpoint_times), "s", arguments.repeats,
                            samples=checkpoint_times))
            rows.append(Row(group, "--checkpoint / --model-dir", median(checkpoint_times) / median(folder_times),
                            "x", arguments.repeats))
    print()
    print(markdown_table(rows))
    write_json(arguments.output, rows, {"repeats": arguments.repeats, "model_size": "tiny"})
    progress(f"wrote {arguments.output}")


if __name__ == "__main__":
    main()
