"""Finding the pipeline folder in a model directory, and unpacking a zipped one safely and only once."""

import multiprocessing
import os
import stat
import zipfile
from pathlib import Path

import pytest

from handler.model.pipeline_files import (
    DONE_MARKER,
    MODEL_INDEX,
    UNPACK_FOLDER,
    ArchiveError,
    find_pipeline_folder,
    locate_pipeline,
    safe_extract,
    unpack_once,
)

PIPELINE_FILES = {
    MODEL_INDEX: '{"_class_name": "StableDiffusionPipeline"}',
    "unet/config.json": '{"sample_size": 8}',
    "unet/diffusion_pytorch_model.safetensors": "weights",
    "scheduler/scheduler_config.json": "{}",
}


def write_pipeline(folder: Path) -> Path:
    for name, text in PIPELINE_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def zip_pipeline(archive: Path, prefix: str = "pipeline/", extra_files: int = 0) -> Path:
    with zipfile.ZipFile(archive, "w") as bundle:
        for name, text in PIPELINE_FILES.items():
            bundle.writestr(prefix + name, text)
        for number in range(extra_files):
            bundle.writestr(f"{prefix}text_encoder/part_{number}.bin", os.urandom(2048))
    return archive


def crafted_zip(archive: Path, *entries: zipfile.ZipInfo | str) -> Path:
    """A zip holding a harmless file first, then the given entries (each with a little content)."""
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("pipeline/" + MODEL_INDEX, "{}")
        for entry in entries:
            bundle.writestr(entry, "payload")
    return archive


def tree(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


# --- find_pipeline_folder / locate_pipeline ------------------------------------------------------------------


def test_find_pipeline_folder_at_root(tmp_path):
    write_pipeline(tmp_path)
    (tmp_path / "nested").mkdir()
    write_pipeline(tmp_path / "nested")
    assert find_pipeline_folder(tmp_path) == tmp_path


def test_find_pipeline_folder_one_level_down(tmp_path):
    (tmp_path / "MAR-INF").mkdir()
    (tmp_path / "MAR-INF" / "MANIFEST.json").write_text("{}")
    (tmp_path / "handler.py").write_text("")
    write_pipeline(tmp_path / "tiny-sd")
    assert find_pipeline_folder(tmp_path) == tmp_path / "tiny-sd"


def test_find_pipeline_folder_prefers_the_shallowest(tmp_path):
    write_pipeline(tmp_path / "a" / "deep")
    write_pipeline(tmp_path / "b")
    assert find_pipeline_folder(tmp_path) == tmp_path / "b"


def test_find_pipeline_folder_none(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("")
    assert find_pipeline_folder(tmp_path) is None


def test_find_pipeline_folder_skips_mar_inf(tmp_path):
    write_pipeline(tmp_path / "MAR-INF")
    assert find_pipeline_folder(tmp_path) is None


def test_locate_pipeline_with_a_folder(tmp_path):
    write_pipeline(tmp_path / "pipeline")
    assert locate_pipeline(tmp_path) == tmp_path / "pipeline"
    assert not (tmp_path / UNPACK_FOLDER).exists()


def test_locate_pipeline_with_a_zip(tmp_path):
    zip_pipeline(tmp_path / "model.zip")
    folder = locate_pipeline(tmp_path)
    assert folder == tmp_path / UNPACK_FOLDER / "pipeline"
    for name, text in PIPELINE_FILES.items():
        assert (folder / name).read_text() == text
    assert (tmp_path / UNPACK_FOLDER / DONE_MARKER).exists()
    # A second worker finds the same folder without unpacking again.
    (folder / "unet" / "config.json").write_text("changed")
    assert locate_pipeline(tmp_path) == folder
    assert (folder / "unet" / "config.json").read_text() == "changed"


def test_locate_pipeline_with_a_zip_of_the_files_at_its_root(tmp_path):
    zip_pipeline(tmp_path / "model.zip", prefix="")
    assert locate_pipeline(tmp_path) == tmp_path / UNPACK_FOLDER


def test_locate_pipeline_with_two_zips(tmp_path):
    zip_pipeline(tmp_path / "a.zip")
    zip_pipeline(tmp_path / "b.zip")
    with pytest.raises(ArchiveError, match="a.zip"):
        locate_pipeline(tmp_path)
    assert not (tmp_path / UNPACK_FOLDER).exists()


def test_locate_pipeline_with_nothing(tmp_path):
    (tmp_path / "handler.py").write_text("")
    with pytest.raises(ArchiveError, match=MODEL_INDEX):
        locate_pipeline(tmp_path)


def test_locate_pipeline_with_a_zip_without_model_index(tmp_path):
    with zipfile.ZipFile(tmp_path / "model.zip", "w") as bundle:
        bundle.writestr("weights/model.bin", "x")
    with pytest.raises(ArchiveError, match=MODEL_INDEX):
        locate_pipeline(tmp_path)


# --- safe_extract --------------------------------------------------------------------------------------------


def symlink_entry(name: str) -> zipfile.ZipInfo:
    entry = zipfile.ZipInfo(name)
    entry.external_attr = (stat.S_IFLNK | 0o777) << 16
    return entry


@pytest.mark.parametrize("make_entry", [
    lambda tmp_path: str(tmp_path / "absolute_evil"),
    lambda tmp_path: "../evil",
    lambda tmp_path: "a/../../evil",
    lambda tmp_path: "pipeline/../../../evil",
    lambda tmp_path: "..\\evil",
    lambda tmp_path: "C:/evil",
    lambda tmp_path: symlink_entry("pipeline/link"),
], ids=["absolute", "dot-dot", "nested-dot-dot", "deep-dot-dot", "backslash", "drive-letter", "symlink"])
def test_safe_extract_refuses_crafted_entries(tmp_path, make_entry):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    archive = crafted_zip(tmp_path / "crafted.zip", make_entry(tmp_path))
    target = model_dir / UNPACK_FOLDER
    target.mkdir()
    before = tree(tmp_path)

    with pytest.raises(ArchiveError, match="refusing archive entry"):
        safe_extract(archive, target)

    assert tree(tmp_path) == before  # nothing written anywhere: not outside, and not the harmless entry either
    assert list(target.iterdir()) == []


def test_unpack_once_refuses_a_crafted_zip_and_marks_nothing_done(tmp_path):
    archive = crafted_zip(tmp_path / "crafted.zip", "../evil")
    target = tmp_path / "model" / UNPACK_FOLDER
    with pytest.raises(ArchiveError):
        unpack_once(archive, target)
    assert not (target / DONE_MARKER).exists()
    assert not (tmp_path / "model" / "evil").exists() and not (tmp_path / "evil").exists()


def test_extracted_files_are_world_readable(tmp_path):
    archive = tmp_path / "private.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for name in ("pipeline/" + MODEL_INDEX, "pipeline/unet/weights.bin"):
            entry = zipfile.ZipInfo(name)
            entry.external_attr = (stat.S_IFREG | 0o600) << 16
            bundle.writestr(entry, "data")
    target = tmp_path / "out"
    old_umask = os.umask(0o077)  # what a locked-down worker might run with
    try:
        safe_extract(archive, target)
    finally:
        os.umask(old_umask)
    files = [path for path in target.rglob("*") if path.is_file()]
    assert len(files) == 2
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# --- unpack_once across processes ----------------------------------------------------------------------------


def unpack_in_child(archive: str, target: str, start, results) -> None:
    start.wait()
    results.put((os.getpid(), unpack_once(Path(archive), Path(target))))


def test_unpack_once_from_four_processes(tmp_path):
    archive = zip_pipeline(tmp_path / "model.zip", extra_files=300)
    target = tmp_path / UNPACK_FOLDER
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(4)
    results = context.Queue()
    workers = [context.Process(target=unpack_in_child, args=(str(archive), str(target), start, results))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    assert len({pid for pid, _ in outcomes}) == 4
    assert sorted(did_unpack for _, did_unpack in outcomes) == [False, False, False, True]
    with zipfile.ZipFile(archive) as bundle:
        expected = {info.filename: bundle.read(info) for info in bundle.infolist()}
    for name, content in expected.items():
        assert (target / name).read_bytes() == content
    unpacked_files = {str(path.relative_to(target)) for path in target.rglob("*") if path.is_file()}
    assert unpacked_files == set(expected) | {DONE_MARKER}
