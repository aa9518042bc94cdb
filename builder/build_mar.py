"""Build a TorchServe model archive from a diffusers pipeline: the Python side of build_mar.sh.

Sources: ``--tiny`` (a random-weight pipeline built offline, for tests and demos), ``--model-dir`` (any local
diffusers folder) or ``--model-id`` (downloaded from the Hugging Face hub). All three go through the same
staging and ``torch-model-archiver`` call, so a real model is packaged exactly like the tiny one.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Optional

from builder.components import (ComponentError, check_loras, check_vae, parse_lora_argument, vae_entries,
                                VAE_FOLDER)
from builder.families import FAMILIES, FULL_SIZE_FAMILIES
from builder.weights_dtype import WEIGHTS_DTYPES, convert_weights
from handler.model.adapters import LORA_SUFFIX, PACKAGED_FOLDER
from handler.model.pipeline_files import find_pipeline_folder
from handler.model.weight_files import WeightFileError, check_weights_in, is_pickle, read_header, refuse_pickle

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_PACKAGE = REPO_ROOT / "handler"  # what a worker runs; the builder itself is never shipped
PIPELINE_FOLDER = "pipeline"
# A pipeline's configs, tokenizers and per-component safetensors weights; not root-level single-file
# checkpoints, and not weight variants (diffusion_pytorch_model.fp16.safetensors), which would multiply the size.
DOWNLOAD_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors", "*/*.model"]
VARIANT_PATTERNS = ["*/*.*.safetensors"]
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
MODEL_INDEX = "model_index.json"
PIPELINE_SEARCH_DEPTH = 3  # --model-dir levels searched for model_index.json (hub cache: hub/models--X/snapshots/REV)
TRANSLATOR_FOLDER = "translator"  # where the handler looks for it (handler/model/translation.py)
# Weights for other frameworks that hub translation models carry beside the PyTorch ones: never needed here.
OTHER_FRAMEWORK_WEIGHTS = ("tf_model.h5", "flax_model.msgpack", "rust_model.ot")
TRANSLATOR_WEIGHTS = "model.safetensors"


def progress(message: str) -> None:
    print(f"[build_mar] {message}", flush=True)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="build_mar.sh", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="build a tiny random-weight pipeline offline")
    source.add_argument("--model-dir", type=Path, help="a local diffusers pipeline folder (holds model_index.json)")
    source.add_argument("--model-id", help="a Hugging Face hub id to download, e.g. stabilityai/stable-diffusion-2-1")
    source.add_argument("--checkpoint", type=Path,
                        help="a single-file .safetensors checkpoint (civitai, AUTOMATIC1111: SD 1.x, SD 2.x, SDXL "
                             "base, SD3, Flux), converted once into a diffusers folder")
    parser.add_argument("--config-from", metavar="DIR_OR_HUB_ID",
                        help="with --checkpoint: the diffusers layout (configs, tokenizers, scheduler) to convert "
                             "into; default: the family's standard hub repository (needs the hub at build time)")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) for --model-id")
    parser.add_argument("--family", choices=FAMILIES, default="sd1",
                        help="with --tiny: which pipeline family's layout to build (default: %(default)s)")
    parser.add_argument("--full-size", action="store_true",
                        help="with --tiny: random weights with the family's exact published configs (sd1, sd2-v, "
                             "sdxl, sd3 without T5; 2-7 GB of fp16 safetensors) instead of tiny ones, to measure "
                             "real-scale costs")
    parser.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES,
                        help="convert the pipeline's weights to this dtype at build time; when it is the served "
                             "dtype (model-config.yaml's dtype, e.g. bfloat16 on a CPU), workers map the weights "
                             "from the archive instead of copying them, so several workers share one copy")
    parser.add_argument("--name", default="stable_diffusion", help="model name in TorchServe (default: %(default)s)")
    parser.add_argument("--archive-format", choices=("zip", "no-archive"), default="zip",
                        help="zip: one .mar file, the pipeline stored uncompressed (TorchServe's extraction is a copy and "
                             "the handler loads it in place); no-archive: a folder, which TorchServe serves without "
                             "copying (default: %(default)s)")
    parser.add_argument("--config-file", type=Path, default=REPO_ROOT / "model-config.yaml",
                        help="model-config.yaml to package (default: the repository's)")
    parser.add_argument("--export-path", type=Path, default=REPO_ROOT / "model_store",
                        help="where the archive is written (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "build",
                        help="scratch space for built and downloaded pipelines (default: %(default)s)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                        help="pack a LoRA file (diffusers/PEFT or kohya .safetensors) that requests may name; "
                             "repeatable; each is loaded into the pipeline first and refused if it does not fit")
    parser.add_argument("--vae", type=Path, help="a diffusers VAE folder that replaces the pipeline's VAE")
    parser.add_argument("--translator", type=Path,
                        help="a transformers translation model folder (MarianMT, e.g. opus-mt-zh-en) to pack; "
                             "prompts are translated per the translate setting")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing archive of the same name in the export path")
    parser.add_argument("--controlnet", action="append", default=[], metavar="NAME=FOLDER",
                        help="pack a diffusers ControlNet folder under NAME, checked against the pipeline "
                             "(repeatable)")
    parser.add_argument("--embedding", action="append", default=[], metavar="NAME=FILE",
                        help="pack a textual-inversion embedding (.safetensors: AUTOMATIC1111, diffusers or an SDXL "
                             "clip_l/clip_g pair) that prompts use by NAME; repeatable")
    parser.add_argument("--ip-adapter", action="append", default=[], metavar="NAME=DIR",
                        help="pack an IP-Adapter (its .safetensors with the image_encoder/ beside it) that requests "
                             "name in ip_adapter; repeatable; each is loaded into the pipeline first")
    arguments = parser.parse_args(argv)
    if arguments.revision and not arguments.model_id:
        parser.error("--revision goes with --model-id")
    if arguments.config_from and not arguments.checkpoint:
        parser.error("--config-from goes with --checkpoint")
    if arguments.family != "sd1" and not arguments.tiny:
        parser.error("--family goes with --tiny")
    if arguments.full_size and not arguments.tiny:
        parser.error("--full-size goes with --tiny")
    if arguments.full_size and arguments.family not in FULL_SIZE_FAMILIES:
        parser.error(f"--full-size exists for the families {', '.join(FULL_SIZE_FAMILIES)}; got {arguments.family}")
    try:
        arguments.lora = [parse_lora_argument(text) for text in arguments.lora]
    except ComponentError as error:
        parser.error(str(error.code).removeprefix("build_mar: "))
    if not MODEL_NAME.fullmatch(arguments.name):
        parser.error(f"--name must be letters, digits, _ and -, starting with a letter or digit; got {arguments.name!r}")
    return arguments


def pipeline_source(arguments: argparse.Namespace) -> Path:
    """The folder holding model_index.json, built or downloaded as the arguments ask."""
    if arguments.tiny and arguments.full_size:
        from builder.full_size import build_full_size_pipeline

        folder = arguments.work_dir / f"full-{arguments.family}"
        progress(f"building the full-size random-weight {arguments.family} pipeline in {folder}")
        shutil.rmtree(folder, ignore_errors=True)
        return build_full_size_pipeline(folder, arguments.family, arguments.work_dir, progress)
    if arguments.tiny:
        from builder.tiny_pipeline import build_tiny_pipeline

        folder = arguments.work_dir / f"tiny-{arguments.family}"
        progress(f"building the tiny random-weight {arguments.family} pipeline in {folder}")
        shutil.rmtree(folder, ignore_errors=True)
        build_tiny_pipeline(folder, arguments.family)
        return folder
    if arguments.model_dir:
        folders = find_pipeline_folders(arguments.model_dir) if arguments.model_dir.is_dir() else []
        if not folders:
            raise SystemExit(f"build_mar: {arguments.model_dir} holds no model_index.json; pass a diffusers pipeline "
                             "folder (as written by save_pretrained or downloaded from the hub)")
        if len(folders) > 1:
            listing = "".join(f"\n  {folder}" for folder in folders)
            raise SystemExit(f"build_mar: {arguments.model_dir} holds {len(folders)} diffusers pipelines (folders with "
                             f"model_index.json):{listing}\npass one of them with --model-dir")
        return folders[0]
    if arguments.checkpoint:
        from builder.checkpoints import CheckpointError, convert_checkpoint

        try:
            return convert_checkpoint(arguments.checkpoint, arguments.config_from,
                                      arguments.work_dir / f"checkpoint-{arguments.checkpoint.stem}",
                                      arguments.work_dir / "downloads", progress)
        except CheckpointError as error:
            raise SystemExit(f"build_mar: {error}") from None
    return download(arguments.model_id, arguments.revision, arguments.work_dir / "downloads")


def find_pipeline_folders(root: Path, max_depth: int = PIPELINE_SEARCH_DEPTH) -> list[Path]:
    """Every pipeline folder (one holding model_index.json) at most ``max_depth`` levels below ``root``.

    A pipeline folder is not searched further: its subfolders (unet/, vae/, ...) are its components. Hidden
    folders (download caches, .git), symbolic links and folders that cannot be read are skipped.
    """
    found, level = [], [Path(root)]
    for depth in range(max_depth + 1):
        below = []
        for folder in sorted(level):
            if (folder / MODEL_INDEX).is_file():
                found.append(folder)
            elif depth < max_depth:
                try:
                    below += [child for child in folder.iterdir()
                              if child.is_dir() and not child.is_symlink() and not child.name.startswith(".")]
                except OSError:
                    pass
        level = below
    return sorted(found)


def archive_path(arguments: argparse.Namespace) -> Path:
    """Where the build writes: NAME.mar, or the folder NAME for no-archive."""
    if arguments.archive_format == "zip":
        return arguments.export_path / f"{arguments.name}.mar"
    return arguments.export_path / arguments.name


def refuse_to_overwrite(arguments: argparse.Namespace) -> None:
    """Stop before any work if the archive exists and --force was not given."""
    output = archive_path(arguments)
    if os.path.lexists(output) and not arguments.force:
        kind = "archive folder" if output.is_dir() else "archive"
        raise SystemExit(f"build_mar: the {kind} {output} already exists; pass --force to overwrite it, or "
                         f"--name to build one under another name")


def download(model_id: str, revision, downloads: Path) -> Path:
    """Download a hub pipeline's configs, tokenizers and safetensors weights, with progress bars."""
    from huggingface_hub import snapshot_download

    target = downloads / model_id.replace("/", "--")
    progress(f"downloading {model_id}{'@' + revision if revision else ''} to {target}")
    try:
        snapshot_download(model_id, revision=revision, local_dir=target, allow_patterns=DOWNLOAD_PATTERNS,
                          ignore_patterns=VARIANT_PATTERNS)
    except Exception as error:
        raise SystemExit(
            f"build_mar: could not download {model_id}: {type(error).__name__}: {error}\n"
            "Check the id, the network and HF_TOKEN (for gated models), or download the folder elsewhere and "
            "use --model-dir."
        ) from None
    folder = find_pipeline_folder(target)
    if folder is None:
        raise SystemExit(f"build_mar: {model_id} has no model_index.json: it is not a diffusers pipeline")
    return folder


def pipeline_files(folder: Path, vae: Optional[Path] = None) -> list[tuple[Path, str]]:
    """Files of a pipeline folder as (source, path inside the pipeline), without hidden files (download caches,
    .gitattributes); with ``vae``, that folder's files instead of the pipeline's own ``vae/``."""
    files = [(path, path.relative_to(folder).as_posix()) for path in sorted(folder.rglob("*"))
             if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)]
    if vae is None:
        return files
    return sorted([entry for entry in files if not entry[1].startswith(f"{VAE_FOLDER}/")] + vae_entries(vae),
                  key=lambda entry: entry[1])


def write_mar(layout: Path, folder: Path, archive: Path, vae: Optional[Path] = None) -> None:
    """Write the .mar: the archiver's layout (manifest, handler, config, adapters) and the pipeline's files under
    ``pipeline/``, all stored without compression.

    Weights do not compress, and a stored entry is extracted by a plain copy: TorchServe's unpacking of the
    .mar is then the only copy the server makes, and the handler loads the pipeline where it lies (a nested
    pipeline.zip cost a second extraction and a second copy on disk). Entries are world-readable: safetensors
    writes its files 0600, and an archive that kept that mode could not be read by a server running as another
    user. Written beside the target and renamed, so a failed build never leaves half an archive.
    """
    entries = [(path, path.relative_to(layout).as_posix()) for path in sorted(layout.rglob("*")) if path.is_file()]
    entries += [(path, f"{PIPELINE_FOLDER}/{name}") for path, name in pipeline_files(folder, vae)]
    total = sum(path.stat().st_size for path, _ in entries)
    partial = archive.with_name(archive.name + ".partial")
    written = 0
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as bundle:
        for path, name in entries:
            entry = zipfile.ZipInfo.from_file(path, arcname=name)
            entry.external_attr = 0o100644 << 16
            entry.compress_type = zipfile.ZIP_STORED
            with open(path, "rb") as source, bundle.open(entry, "w", force_zip64=True) as target:
                shutil.copyfileobj(source, target, 16 * 1024 * 1024)
            written += path.stat().st_size
            if name.startswith(f"{PIPELINE_FOLDER}/"):
                progress(f"  stored {name} ({_megabytes(written)}/{_megabytes(total)} MB)")
    os.replace(partial, archive)


def copy_pipeline(folder: Path, target: Path, vae: Optional[Path] = None) -> None:
    """Copy the pipeline as a plain folder, world-readable, with progress."""
    files = pipeline_files(folder, vae)
    total = sum(path.stat().st_size for path, _ in files)
    written = 0
    for path, name in files:
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
        os.chmod(destination, 0o644)
        written += path.stat().st_size
        progress(f"  copied {name} ({_megabytes(written)}/{_megabytes(total)} MB)")


def stage_loras(loras: list[tuple[str, Path]], staging: Path) -> None:
    """Copy the LoRA files to ``loras/NAME.safetensors``, the folder the handler reads them from."""
    for name, path in loras:
        destination = staging / PACKAGED_FOLDER / f"{name}{LORA_SUFFIX}"
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
        os.chmod(destination, 0o644)


def translator_files(folder: Path) -> list[Path]:
    """The files of a translation model folder to pack: configs, tokenizer files and its safetensors weights."""
    if not (folder / "config.json").is_file():
        raise SystemExit(f"build_mar: --translator {folder} holds no config.json; pass a transformers translation "
                         "model folder (as save_pretrained writes it, e.g. a download of Helsinki-NLP/opus-mt-zh-en)")
    weights = folder / TRANSLATOR_WEIGHTS
    if not weights.is_file():
        for path in sorted(folder.iterdir()):
            refuse_pickle(path, "--translator")
        raise SystemExit(f"build_mar: --translator {folder} holds no {TRANSLATOR_WEIGHTS} (only safetensors "
                         "weights are packed)")
    read_header(weights, "--translator")
    # Hub translation repos carry pickled copies of the same weights beside the safetensors: never packed.
    return [path for path, _ in pipeline_files(folder)
            if path.name not in OTHER_FRAMEWORK_WEIGHTS and not is_pickle(path)]


def stage_translator(folder: Path, staging: Path) -> None:
    """Copy the translator into the staging folder, world-readable, with progress."""
    files = translator_files(folder)
    total = sum(path.stat().st_size for path in files)
    written = 0
    for path in files:
        destination = staging / TRANSLATOR_FOLDER / path.relative_to(folder)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
        os.chmod(destination, 0o644)
        written += path.stat().st_size
        progress(f"  translator: copied {path.relative_to(folder)} ({_megabytes(written)}/{_megabytes(total)} MB)")


def stage_handler(staging: Path) -> None:
    """Copy the handler package into the staging folder, so the archive runs without this repository."""
    shutil.copytree(SHIPPED_PACKAGE, staging / SHIPPED_PACKAGE.name,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def archiver_command() -> str:
    """torch-model-archiver from this Python's environment, else from PATH."""
    beside_python = Path(sys.executable).parent / "torch-model-archiver"
    found = str(beside_python) if beside_python.exists() else shutil.which("torch-model-archiver")
    if found is None:
        raise SystemExit("build_mar: torch-model-archiver is not installed; run scripts/setup.sh first")
    return found


def run_archiver(arguments: argparse.Namespace, staging: Path, export_path: Path) -> None:
    """Call torch-model-archiver for the archive folder ``export_path/NAME`` (manifest, handler, config, the
    staged files), printing a heartbeat while it works (it prints nothing itself)."""
    command = [
        archiver_command(),
        "--model-name", arguments.name,
        "--version", "1.0",
        "--handler", str(staging / SHIPPED_PACKAGE.name / "stable_diffusion_handler.py"),
        "--extra-files", str(staging),
        "--config-file", str(arguments.config_file),
        "--export-path", str(export_path),
        "--archive-format", "no-archive",
        "--force",
    ]
    finished = threading.Event()

    def heartbeat():
        started = time.monotonic()
        while not finished.wait(5):
            progress(f"  torch-model-archiver still running ({time.monotonic() - started:.0f} s)")

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        subprocess.run(command, check=True)
    finally:
        finished.set()
        thread.join()


def build(arguments: argparse.Namespace) -> Path:
    """Build the archive and return its path (a .mar file, or a folder for no-archive)."""
    started = time.monotonic()
    refuse_to_overwrite(arguments)
    if not arguments.config_file.is_file():
        raise SystemExit(f"build_mar: config file {arguments.config_file} not found")
    if arguments.translator is not None:
        translator_files(arguments.translator)  # refuse a wrong folder before building or downloading anything
    folder = pipeline_source(arguments)
    check_weights_in(folder, "the pipeline")
    if arguments.weights_dtype is not None:
        progress(f"converting the weights to {arguments.weights_dtype}")
        folder = convert_weights(folder, arguments.work_dir / f"converted-{arguments.name}", arguments.weights_dtype,
                                 progress)
    if arguments.vae is not None:
        check_vae(folder, arguments.vae)
        progress(f"the VAE of {arguments.vae} replaces the pipeline's")
    if arguments.lora:
        check_loras(folder, arguments.lora, progress)
    arguments.export_path.mkdir(parents=True, exist_ok=True)
    staging = arguments.work_dir / f"staging-{arguments.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    stage_handler(staging)
    stage_loras(arguments.lora, staging)
    if arguments.translator is not None:
        progress(f"packing the translator {arguments.translator} into {TRANSLATOR_FOLDER}/")
        stage_translator(arguments.translator, staging)
    if arguments.controlnet:
        from builder.controlnets import ControlNetError, stage_controlnets

        progress(f"checking and staging {len(arguments.controlnet)} ControlNet(s)")
        try:
            stage_controlnets(arguments.controlnet, folder, staging, progress)
        except ControlNetError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise SystemExit(f"build_mar: {error}") from None
    if arguments.embedding:
        from builder.embeddings import EmbeddingError, stage_embeddings

        progress(f"checking and staging {len(arguments.embedding)} embedding(s)")
        try:
            stage_embeddings(arguments.embedding, folder, staging, progress)
        except EmbeddingError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise SystemExit(f"build_mar: {error}") from None
    if arguments.ip_adapter:
        from builder.ip_adapters import IpAdapterError, stage_ip_adapters

        try:
            stage_ip_adapters(arguments.ip_adapter, folder, staging, progress)
        except IpAdapterError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise SystemExit(f"build_mar: {error}") from None
    if arguments.archive_format == "zip":
        output = archive_path(arguments)
        layout = arguments.work_dir / f"layout-{arguments.name}"
        shutil.rmtree(layout, ignore_errors=True)
        layout.mkdir(parents=True)
        progress("[1/2] writing the manifest and handler with torch-model-archiver")
        run_archiver(arguments, staging, layout)
        progress(f"[2/2] writing {output}, {folder} stored uncompressed under {PIPELINE_FOLDER}/")
        write_mar(layout / arguments.name, folder, output, arguments.vae)
        shutil.rmtree(layout, ignore_errors=True)
    else:
        output = archive_path(arguments)
        if output.is_dir() and not output.is_symlink():
            shutil.rmtree(output)
        elif os.path.lexists(output):
            output.unlink()
        progress("[1/2] writing the archive folder with torch-model-archiver")
        run_archiver(arguments, staging, arguments.export_path)
        progress(f"[2/2] copying {folder} into {output / PIPELINE_FOLDER}")
        copy_pipeline(folder, output / PIPELINE_FOLDER, arguments.vae)
    shutil.rmtree(staging, ignore_errors=True)
    if arguments.weights_dtype is not None:
        shutil.rmtree(folder, ignore_errors=True)  # the converted copy: the archive holds it now
    progress(f"done in {time.monotonic() - started:.1f} s: {output} ({_megabytes(_size(output))} MB)")
    return output


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f}"


def main(argv=None) -> None:
    try:
        build(parse_arguments(argv))
    except WeightFileError as error:
        raise SystemExit(f"build_mar: {error}") from None


if __name__ == "__main__":
    main()
