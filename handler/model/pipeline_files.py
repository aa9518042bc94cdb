"""Find the diffusers pipeline folder inside a model directory, unpacking a zipped one once and safely.

An archive may hold the pipeline as a folder (``--archive-format no-archive`` builds, or a folder one level
down) or as a zip (TorchServe's upstream example packs ``model.zip``). All workers of a model share one model
directory, so unpacking is serialised with a file lock and marked done with a sentinel file: the first worker
unpacks, the others wait and reuse its result.
"""

import fcntl
import logging
import os
import stat
import zipfile
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
UNPACK_FOLDER = "unpacked_pipeline"
DONE_MARKER = ".unpack-complete"


class ArchiveError(ValueError):
    """A packaged pipeline that cannot be used as it is (unsafe entries, no model_index.json)."""


def find_pipeline_folder(root: Path, max_depth: int = 2) -> Path | None:
    """The shallowest folder under ``root`` (itself included) that holds model_index.json."""
    level = [Path(root)]
    for _ in range(max_depth + 1):
        for folder in sorted(level):
            if (folder / MODEL_INDEX).is_file():
                return folder
        level = [child for folder in level for child in folder.iterdir()
                 if child.is_dir() and not child.is_symlink() and child.name != "MAR-INF"]
    return None


def locate_pipeline(model_dir: Path) -> Path:
    """The pipeline folder for ``model_dir``: a folder already there, or the unpacked zip beside it."""
    model_dir = Path(model_dir)
    unpacked = model_dir / UNPACK_FOLDER
    folder = find_pipeline_folder(model_dir)
    if folder is not None and unpacked not in folder.parents and folder != unpacked:
        return folder
    archives = sorted(path for path in model_dir.glob("*.zip") if path.is_file())
    if not archives:
        raise ArchiveError(f"no {MODEL_INDEX} and no .zip in {model_dir}: the archive holds no diffusers pipeline")
    if len(archives) > 1:
        raise ArchiveError(f"several zips in {model_dir} ({[path.name for path in archives]}); package one pipeline")
    if unpack_once(archives[0], unpacked):
        logger.info("unpacked %s into %s", archives[0].name, unpacked)
    else:
        logger.info("reusing %s, unpacked by another worker", unpacked)
    folder = find_pipeline_folder(unpacked)
    if folder is None:
        raise ArchiveError(f"{archives[0].name} holds no {MODEL_INDEX}")
    return folder


def unpack_once(archive: Path, target: Path) -> bool:
    """Unpack ``archive`` into ``target`` unless another worker already did. Returns True if this call did."""
    target.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / DONE_MARKER).exists():
            return False
        safe_extract(archive, target)
        (target / DONE_MARKER).touch()
        return True


def safe_extract(archive: Path, target: Path) -> None:
    """Extract every entry of a zip inside ``target``; refuse the whole archive if any entry could escape it.

    Refused: absolute paths, ``..`` components, drive letters and symbolic links.
    """
    target = Path(target).resolve()
    with zipfile.ZipFile(archive) as bundle:
        entries = bundle.infolist()
        for entry in entries:
            check_entry(entry, target)
        total = len(entries)
        for number, entry in enumerate(entries, start=1):
            bundle.extract(entry, target)
            if number % 50 == 0 or number == total:
                logger.info("unpacked %d/%d entries of %s", number, total, archive.name)
    for path in target.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o644)


def check_entry(entry: zipfile.ZipInfo, target: Path) -> None:
    """Raise ArchiveError if extracting ``entry`` could write outside ``target``."""
    name = entry.filename
    path = PurePosixPath(name.replace("\\", "/"))
    if stat.S_ISLNK(entry.external_attr >> 16):
        raise ArchiveError(f"refusing archive entry {name!r}: symbolic links are not allowed")
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise ArchiveError(f"refusing archive entry {name!r}: it would land outside {target}")
    destination = (target / path).resolve()
    if destination != target and target not in destination.parents:
        raise ArchiveError(f"refusing archive entry {name!r}: it would land outside {target}")
