"""build_mar.sh's command line: clear failures for sources it cannot use."""

import os
import subprocess
import sys

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
