"""build_mar.sh's command line: clear failures for sources it cannot use, and archives it will not overwrite."""

import os
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO_ROOT


def build_mar(*arguments, **env):
    return subprocess.run([str(REPO_ROOT / "build_mar.sh"), *map(str, arguments)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_an_unreachable_hub_fails_with_a_clear_message(tmp_path):
    result = build_mar("--model-id", "stabilityai/stable-diffusion-2-1", "--export-path", tmp_path / "store",
                       "--work-dir", tmp_path / "work", HF_HUB_OFFLINE="1")
    assert result.returncode != 0
    assert "could not download stabilityai/stable-diffusion-2-1" in result.stderr
    assert "--model-dir" in result.stderr
    assert not (tmp_path / "store" / "stable_diffusion.mar").exists()


def test_a_folder_without_model_index_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    result = build_mar("--model-dir", tmp_path / "weights", "--export-path", tmp_path / "store")
    assert result.returncode != 0 and "holds no model_index.json" in result.stderr


def test_family_needs_tiny(tmp_path):
    result = build_mar("--model-dir", tmp_path, "--family", "flux")
    assert result.returncode != 0 and "--family goes with --tiny" in result.stderr


def test_names_that_are_not_plain_are_refused_before_anything_is_deleted(tmp_path):
    store = tmp_path / "store"
    (store / "keep").mkdir(parents=True)
    for name in ("..", "", "a/b", ".hidden"):
        result = build_mar("--tiny", "--name", name, "--archive-format", "no-archive", "--export-path", store)
        assert result.returncode != 0 and "--name must be" in result.stderr
    assert (store / "keep").is_dir()


# --model-dir: one pipeline, found a few levels down, or a refusal that lists every pipeline found

def test_a_folder_holding_several_pipelines_is_refused_with_the_list(tmp_path):
    from builder.tiny_pipeline import build_tiny_pipeline

    pipelines = [tmp_path / "models" / "sd", tmp_path / "models" / "nested" / "sd-copy",
                 tmp_path / "models" / "deeper" / "a" / "b"]
    for folder in pipelines:
        build_tiny_pipeline(folder)
    result = build_mar("--model-dir", tmp_path / "models", "--export-path", tmp_path / "store",
                       "--work-dir", tmp_path / "work")
    print(result.stderr)
    assert result.returncode != 0
    assert f"{tmp_path / 'models'} holds 3 diffusers pipelines" in result.stderr
    listed = [line.strip() for line in result.stderr.splitlines() if line.startswith("  ")]
    assert listed == sorted(str(folder) for folder in pipelines)
    assert "pass one of them with --model-dir" in result.stderr
    assert not (tmp_path / "store").exists() and not (tmp_path / "work").exists()


def test_one_pipeline_below_the_folder_is_used_with_its_components(tmp_path):
    """The pipeline's own subfolders (unet/, vae/, ...) hold no model_index.json: still one pipeline."""
    from builder.tiny_pipeline import build_tiny_pipeline

    pipeline = tmp_path / "models" / "org" / "sd"
    build_tiny_pipeline(pipeline)
    (tmp_path / "models" / "notes").mkdir()
    result = build_mar("--model-dir", tmp_path / "models", "--archive-format", "no-archive",
                       "--export-path", tmp_path / "store", "--work-dir", tmp_path / "work")
    assert result.returncode == 0, result.stderr
    shipped = tmp_path / "store" / "stable_diffusion" / "pipeline"
    assert (shipped / "model_index.json").read_bytes() == (pipeline / "model_index.json").read_bytes()
    assert (shipped / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_the_search_for_pipelines_stops_at_a_pipeline_folder(tmp_path):
    """A pipeline folder is one pipeline even if something below it also holds a model_index.json."""
    from builder.build_mar import find_pipeline_folders

    (tmp_path / "sd" / "unet").mkdir(parents=True)
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    (tmp_path / "sd" / "unet" / "model_index.json").write_text("{}")
    (tmp_path / ".cache" / "x").mkdir(parents=True)
    (tmp_path / ".cache" / "x" / "model_index.json").write_text("{}")
    (tmp_path / "too" / "deep" / "for" / "the" / "search").mkdir(parents=True)
    (tmp_path / "too" / "deep" / "for" / "the" / "search" / "model_index.json").write_text("{}")
    assert find_pipeline_folders(tmp_path) == [tmp_path / "sd"]
    assert find_pipeline_folders(tmp_path / "sd") == [tmp_path / "sd"]


# An existing archive is kept unless --force

def existing_archive(store, archive_format):
    """A stand-in archive of the default name: a placeholder file or folder the build must not touch."""
    if archive_format == "zip":
        path = store / "stable_diffusion.mar"
        store.mkdir(parents=True)
        path.write_text("previous build")
        return path
    path = store / "stable_diffusion"
    path.mkdir(parents=True)
    (path / "previous-build").write_text("previous build")
    return path


@pytest.mark.parametrize("archive_format", ["zip", "no-archive"])
def test_an_existing_archive_is_refused_before_any_work(tmp_path, archive_format):
    from builder.tiny_pipeline import build_tiny_pipeline

    build_tiny_pipeline(tmp_path / "pipeline")
    path = existing_archive(tmp_path / "store", archive_format)
    before = sorted(item.relative_to(tmp_path / "store") for item in (tmp_path / "store").rglob("*"))
    sources = [("--tiny",), ("--model-dir", tmp_path / "pipeline"), ("--model-id", "org/not-downloaded")]
    for source in sources:
        result = build_mar(*source, "--archive-format", archive_format, "--export-path", tmp_path / "store",
                           "--work-dir", tmp_path / "work", HF_HUB_OFFLINE="1")
        print(result.stderr)
        assert result.returncode != 0
        assert f"{path} already exists; pass --force to overwrite it, or --name" in result.stderr
        assert "[build_mar]" not in result.stdout  # nothing built, downloaded or packed
    assert not (tmp_path / "work").exists()
    assert sorted(item.relative_to(tmp_path / "store") for item in (tmp_path / "store").rglob("*")) == before


@pytest.mark.parametrize("archive_format", ["zip", "no-archive"])
def test_force_overwrites_and_another_name_builds_beside(tmp_path, archive_format):
    from builder.tiny_pipeline import build_tiny_pipeline

    build_tiny_pipeline(tmp_path / "pipeline")
    path = existing_archive(tmp_path / "store", archive_format)
    common = ("--model-dir", tmp_path / "pipeline", "--archive-format", archive_format,
              "--export-path", tmp_path / "store", "--work-dir", tmp_path / "work")
    beside = build_mar(*common, "--name", "other")
    assert beside.returncode == 0, beside.stderr
    assert (path.read_text() if path.is_file() else (path / "previous-build").read_text()) == "previous build"
    forced = build_mar(*common, "--force")
    assert forced.returncode == 0, forced.stderr
    if archive_format == "zip":
        assert zipfile.is_zipfile(path)
    else:
        assert not (path / "previous-build").exists()
        assert (path / "MAR-INF" / "MANIFEST.json").is_file() and (path / "pipeline" / "model_index.json").is_file()


def test_a_translator_folder_without_config_is_refused_before_any_work(tmp_path):
    (tmp_path / "opus-mt").mkdir()
    (tmp_path / "opus-mt" / "source.spm").write_bytes(b"x")
    result = build_mar("--tiny", "--translator", tmp_path / "opus-mt", "--export-path", tmp_path / "store",
                       "--work-dir", tmp_path / "work")
    assert result.returncode != 0 and "holds no config.json" in result.stderr
    assert not (tmp_path / "work").exists()


def test_a_translator_packs_its_safetensors_weights_never_a_pickle(tmp_path):
    from builder.build_mar import translator_files
    from handler.model.weight_files import WeightFileError
    from safetensors.torch import save_file
    import torch

    folder = tmp_path / "opus-mt"
    folder.mkdir()
    for name in ("config.json", "vocab.json", "source.spm", "target.spm", "pytorch_model.bin",
                 "tf_model.h5", "rust_model.ot", ".gitattributes"):
        (folder / name).write_bytes(b"x")
    save_file({"weight": torch.zeros(2)}, folder / "model.safetensors")
    assert sorted(path.name for path in translator_files(folder)) == [
        "config.json", "model.safetensors", "source.spm", "target.spm", "vocab.json"]
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightFileError, match="arbitrary code"):
        translator_files(folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(SystemExit, match="holds no model.safetensors"):
        translator_files(folder)
