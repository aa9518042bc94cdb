"""The .mar serves from a brand-new environment that holds only the runtime dependencies, not this repository.

A virtual environment is created in a temporary folder and gets ``pip install -c constraints.txt -r
requirements-serve.txt``: the serving list alone (setup.py's ``serve`` extra, what the serving image installs;
torch pinned by constraints.txt to the CPU build). TorchServe is started from it,
outside the repository and without PYTHONPATH, so the workers can only run what the archive ships.
The environment is built once per test session (a minute or two: pip prints its progress).
"""

import ast
import io
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import requests
from PIL import Image

from conftest import REPO_ROOT

pytestmark = pytest.mark.serving

SERVE_REQUIREMENTS = REPO_ROOT / "requirements-serve.txt"
# Imported only by a preset that asks for them, and installed by its extra: a load that needs one and lacks it
# fails with a message naming the package (handler/model/optimizations.py).
OPTIONAL = {"torchao": "quantization"}
REQUEST = {"prompt": "a cat", "num_inference_steps": 2, "width": 64, "height": 64, "output_format": "png"}
REPOSITORY_MODULES = ["handler", "builder", "sdclient", "harness"]


def progress(message: str) -> None:
    print(f"[fresh-env] {message}", flush=True)


@contextmanager
def visible(request):
    """Let output through pytest's capture (pip's progress), so a minute of install is not silent."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        yield
        return
    with capture.global_and_fixture_disabled():
        yield


def clean_environment() -> dict[str, str]:
    """This process's environment without anything that would put the repository or its venv on sys.path."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory, request):
    """A new virtual environment with only the runtime dependencies, as its bin/ folder; removed at the end of
    the session (1.5 GB, and pytest keeps the temporary folders of the last three sessions)."""
    folder = tmp_path_factory.mktemp("fresh-env")
    venv = folder / "venv"
    started = time.monotonic()
    with visible(request):
        progress(f"creating a virtual environment in {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, cwd=folder, env=clean_environment())
        progress(f"installing {SERVE_REQUIREMENTS.name} with pip (a minute or two)")
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--progress-bar", "off",
                        "-c", str(REPO_ROOT / "constraints.txt"), "-r", str(SERVE_REQUIREMENTS)],
                       check=True, cwd=folder, env=clean_environment(), timeout=1200)
        progress(f"environment ready in {time.monotonic() - started:.0f} s")
    try:
        yield venv / "bin"
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def run_python(bin_dir: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / "python"), "-c", code], cwd=cwd, env=clean_environment(),
                          capture_output=True, text=True, timeout=300)


def handler_third_party_imports() -> list[str]:
    """Top-level names of everything handler/ imports that is neither the standard library nor handler."""
    names = set()
    for path in (REPO_ROOT / "handler").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return sorted(name for name in names if name not in sys.stdlib_module_names and name != "handler")


def test_the_repository_is_not_installed_there(fresh_venv, tmp_path):
    for module in REPOSITORY_MODULES:
        result = run_python(fresh_venv, f"import {module}; print({module}.__file__)", tmp_path)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, \
            f"`import {module}` worked in the fresh environment: {result.stdout.strip()}"
    assert str(REPO_ROOT) not in run_python(fresh_venv, "import sys; print(sys.path)", tmp_path).stdout


def test_it_has_every_package_the_handler_imports(fresh_venv, tmp_path):
    needed = [name for name in handler_third_party_imports() if name not in OPTIONAL]
    assert {"torch", "diffusers", "ts", "cv2"} <= set(needed), needed
    code = "\n".join([
        "import importlib, sys",
        "for name in sys.argv[1:]:",
        "    try:",
        "        importlib.import_module(name)",
        "    except Exception as error:",
        "        print(f'{name}: {error!r}')",
    ])
    result = subprocess.run([str(fresh_venv / "python"), "-c", code, *needed], cwd=tmp_path,
                            env=clean_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not result.stdout.strip(), (f"handler/ imports modules that {SERVE_REQUIREMENTS.name} lacks:\n"
                                       f"{result.stdout}")


def test_the_tiny_mar_serves_from_the_fresh_environment(fresh_venv, tiny_mar, tmp_path, request):
    from harness.local_server import LocalTorchServe

    server = LocalTorchServe(tmp_path / "server", tiny_mar.parent, {"stable_diffusion": tiny_mar.name},
                             bin_dir=fresh_venv)
    assert REPO_ROOT not in server.folder.resolve().parents and REPO_ROOT not in tiny_mar.resolve().parents
    started = time.monotonic()
    server.start()
    with visible(request):
        progress(f"TorchServe from the fresh environment: READY worker after {time.monotonic() - started:.1f} s")
    try:
        for pid in server.worker_pids("stable_diffusion"):
            worker = psutil.Process(pid)
            assert Path(worker.cmdline()[0]).parent == fresh_venv, worker.cmdline()
            assert str(REPO_ROOT) not in worker.environ().get("PYTHONPATH", ""), worker.environ().get("PYTHONPATH")
            assert REPO_ROOT != Path(worker.cwd()) and REPO_ROOT not in Path(worker.cwd()).parents, worker.cwd()
        response = requests.post(f"{server.inference_url}/predictions/stable_diffusion", json=REQUEST,
                                 headers=server.inference_headers(), timeout=120)
        with visible(request):
            progress(f"{response.status_code} after {response.elapsed.total_seconds():.1f} s")
        assert response.status_code == 200, response.text[:500]
        assert response.headers["Content-Type"].startswith("image/png")
        image = Image.open(io.BytesIO(response.content))
        assert (image.format, image.size) == ("PNG", (64, 64))
    finally:
        processes = server.processes()
        server.stop()
        assert not [process for process in processes if process.is_running() and process.status() != "zombie"]
