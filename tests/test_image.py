"""The serving image (deploy/Dockerfile): one dependency list, a Dockerfile that lints, and the image built and
served with the commands of docs/deploying.md.

The fast tests run everywhere: the image installs requirements-serve.txt, the list setup.py's ``serve`` extra
reads (the fresh-environment test serves from it too); its build context holds what it copies; hadolint finds
nothing in it; the CUDA build's arguments are the Dockerfile's, and its torch check refuses a CPU torch.

``test_the_documented_image_builds_serves_and_drains`` runs the commands of docs/deploying.md: it builds the
CPU image with podman from a Debian base made here (debootstrap: no registry is reachable), runs it, and
serves the tiny archive: /ping, the probes, a generation on the native and the KServe v1 route, then a stop
with a generation in flight, which must get its image; then it builds the image with the archive baked in.
It takes minutes (the numbers are in docs/deploying.md), so it runs only with RUN_IMAGE_TEST=1, as
``scripts/test_image.sh`` sets. It needs root and apt-get (scripts/build_image.sh installs podman, buildah,
runc and debootstrap) and the CPU torch wheel in /opt/wheels, as the doc's build command says.
"""

import io
import json
import math
import os
import re
import runpy
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
import setuptools
from PIL import Image

from helpers import MODEL, REPO_ROOT, SMALL

DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
SERVE_REQUIREMENTS = REPO_ROOT / "requirements-serve.txt"
DOC = REPO_ROOT / "docs" / "deploying.md"
HADOLINT = shutil.which("hadolint") or str(Path(os.sys.executable).with_name("hadolint"))


def requirement_name(line: str) -> str:
    return re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-")


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def setup_arguments(monkeypatch) -> dict:
    """The keyword arguments setup.py passes to setup(), read by running it with setup() replaced."""
    captured = {}
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(setuptools, "setup", lambda **arguments: captured.update(arguments))
    runpy.run_path(str(REPO_ROOT / "setup.py"))
    return captured


def test_the_serve_extra_is_the_list_the_image_installs(monkeypatch):
    arguments = setup_arguments(monkeypatch)
    serve = requirement_lines(SERVE_REQUIREMENTS)
    assert arguments["extras_require"]["serve"] == serve
    assert set(serve) <= set(arguments["install_requires"])
    dockerfile = DOCKERFILE.read_text()
    assert "COPY constraints.txt requirements-serve.txt /opt/torchserve-diffusers/" in dockerfile
    assert re.search(r"pip install [^\n]*-c /opt/torchserve-diffusers/constraints.txt \\\n\s*"
                     r"-r /opt/torchserve-diffusers/requirements-serve.txt", dockerfile)
    assert dockerfile.count("pip install") == 2  # torch from its build's source, then the list: nothing else


def test_every_serving_requirement_is_pinned():
    pinned = {requirement_name(line) for line in requirement_lines(REPO_ROOT / "constraints.txt")}
    assert not {requirement_name(line) for line in requirement_lines(SERVE_REQUIREMENTS)} - pinned


def test_the_build_context_holds_what_the_dockerfile_copies():
    copied = set()
    for line in re.findall(r"^COPY (.+)$", DOCKERFILE.read_text(), re.MULTILINE):
        copied.update(line.split()[:-1])
    admitted = {line[1:] for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert admitted == copied
    assert all((REPO_ROOT / path).is_file() for path in copied)


def test_hadolint_finds_nothing_in_the_dockerfile():
    done = subprocess.run([HADOLINT, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_cuda_build_arguments_are_the_dockerfiles():
    """The CUDA command in the Dockerfile's header names only arguments it declares; the torch check compares
    the installed build with TORCH_VARIANT, so a CUDA base with a CPU torch (or the reverse) fails the build."""
    text = DOCKERFILE.read_text()
    declared = set(re.findall(r"^ARG (\w+)", text, re.MULTILINE))
    header = text.split("\n\n", 1)[0]
    assert set(re.findall(r"--build-arg (\w+)=", header)) == {"BASE_IMAGE", "TORCH_VARIANT"} <= declared
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text and "torch.version.cuda is None" in text
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.MULTILINE)


def torch_build_check(variant: str) -> subprocess.CompletedProcess:
    """The Dockerfile's own check of the installed torch against TORCH_VARIANT, run on this environment's."""
    instruction = DOCKERFILE.read_text().replace("\\\n", "")
    (code,) = re.findall(r'python -c "(import sys, torch;.*?)"\n', instruction)
    return subprocess.run([os.sys.executable, "-c", code.replace("${TORCH_VARIANT}", variant)],
                          capture_output=True, text=True, timeout=300)


def test_a_cpu_torch_fails_the_cuda_build_and_passes_the_cpu_one():
    import torch

    assert torch.version.cuda is None  # constraints.txt's CPU build, as the CPU image has
    assert torch_build_check("cpu").returncode == 0
    refused = torch_build_check("cu128")
    assert refused.returncode == 1 and "does not match TORCH_VARIANT=cu128" in refused.stderr, refused.stderr


# --- The image, built and served -------------------------------------------------------------------------------

IMAGE = "localhost/torchserve-diffusers:cpu"
IN_FLIGHT_SECONDS = 10  # how long the generation that the stop meets should take: the stop comes within ~2 s
SIDE = 256


def progress(message: str) -> None:
    print(f"[image] {message}", flush=True)


def doc_blocks(heading: str) -> list[str]:
    """The ```bash blocks of docs/deploying.md's section ``heading``, as a user would paste them."""
    section = DOC.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    assert blocks, f"no bash block under '## {heading}' in {DOC}"
    return blocks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_doc(heading: str, workdir: Path, env: dict, timeout: float) -> str:
    """Run a section's commands in one bash, as written but for the container's name and port."""
    script = "\n".join(doc_blocks(heading))
    script, count = re.subn(r"^NAME=sd PORT=8080\b", f"NAME={env['NAME']} PORT={env['PORT']}", script,
                            flags=re.MULTILINE)
    assert count or "$NAME" not in script, f"'## {heading}' uses $NAME without setting NAME=sd PORT=8080"
    progress(f"running the commands of '## {heading}'")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=workdir, env=env, timeout=timeout,
                          capture_output=True, text=True)
    assert done.returncode == 0, f"{heading}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the committed files (a new user's clone) sharing this environment's .venv."""
    folder = tmp_path_factory.mktemp("clone") / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO_ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, folder / name)
    (folder / ".venv").symlink_to((REPO_ROOT / ".venv").resolve())
    return folder


def long_generation(url: str, headers: dict) -> dict:
    """A request that takes about IN_FLIGHT_SECONDS on this machine now: its speed per step measured first
    (a 1-step and a 6-step generation), as a shared 2-core machine can be ten times slower than an idle one."""
    seconds = []
    for steps in (1, 6):
        body = {"prompt": "a lighthouse in a storm", "num_inference_steps": steps, "width": SIDE, "height": SIDE,
                "output_format": "png"}
        response = requests.post(f"{url}/predictions/{MODEL}", json=body, headers=headers, timeout=600)
        assert response.status_code == 200, response.text[:300]
        seconds.append(response.elapsed.total_seconds())
    per_step = max((seconds[1] - seconds[0]) / 5, 0.001)
    return {**body, "num_inference_steps": min(150, max(10, math.ceil(IN_FLIGHT_SECONDS / per_step)))}


def requests_received(name: str, env: dict) -> int:
    """TorchServe's count of inference requests received (its metrics API, on the container's loopback)."""
    code = ("import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8082/metrics').read().decode())")
    done = subprocess.run(["podman", "exec", name, "python", "-c", code], env=env, capture_output=True, text=True,
                          check=True, timeout=60)
    return sum(int(float(value)) for value in re.findall(r"^ts_inference_requests_total\{[^}]*\} (\S+)$",
                                                         done.stdout, re.MULTILINE))


def inference_key(name: str, env: dict) -> str:
    done = subprocess.run(["podman", "exec", name, "cat", "key_file.json"], env=env, capture_output=True,
                          text=True, check=True, timeout=60)
    return json.loads(done.stdout)["inference"]["key"]


@pytest.mark.serving
@pytest.mark.skipif(os.environ.get("RUN_IMAGE_TEST") != "1",
                    reason="builds a container image (minutes): scripts/test_image.sh runs it")
def test_the_documented_image_builds_serves_and_drains(checkout):
    env = {**os.environ, "NAME": f"sd-test-{os.getpid()}", "PORT": str(free_port()),
           "CONTAINERS_CONF": str(checkout / "deploy" / "containers.conf")}
    started = time.monotonic()
    run_doc("Build the image here", checkout, env, timeout=1800)
    build_seconds = time.monotonic() - started
    size = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", IMAGE], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()
    progress(f"build_mar.sh --tiny and the image build: {build_seconds:.0f} s (podman reuses the base and any layer "
             f"it still has); image {int(size) / 1e6:.0f} MB")

    url = f"http://127.0.0.1:{env['PORT']}"
    try:
        started = time.monotonic()
        run_doc("Run it", checkout, env, timeout=600)
        progress(f"run to a READY worker and the first image: {time.monotonic() - started:.1f} s")
        fox = Image.open(checkout / "fox.png")
        assert (fox.format, fox.size) == ("PNG", (64, 64))

        headers = {"Authorization": f"Bearer {inference_key(env['NAME'], env)}"}
        assert requests.get(f"{url}/ping", headers=headers, timeout=30).json() == {"status": "Healthy"}
        for check in ("live", "ready"):
            probe = subprocess.run(["podman", "exec", env["NAME"], "python", "/opt/torchserve-diffusers/probe.py",
                                    check, "--model", MODEL], env=env, capture_output=True, text=True, timeout=60)
            assert probe.returncode == 0, probe.stdout + probe.stderr
        kserve = requests.post(f"{url}/v1/models/{MODEL}:predict", headers=headers, timeout=300,
                               json={"instances": [{"prompt": "a fox", **SMALL}]})
        assert kserve.status_code == 200 and len(kserve.json()["predictions"]) == 1, kserve.text[:300]
        user = subprocess.run(["podman", "exec", env["NAME"], "id", "-u"], env=env, capture_output=True, text=True)
        assert user.stdout.strip() == "1000"

        long = long_generation(url, headers)
        progress(f"a generation of {long['num_inference_steps']} steps at {SIDE}x{SIDE} in flight, then the stop")
        received = requests_received(env["NAME"], env)
        answer = {}

        def generate():
            answer["response"] = requests.post(f"{url}/predictions/{MODEL}", json=long,
                                               headers=headers, timeout=600)
            answer["at"] = time.monotonic()

        in_flight = threading.Thread(target=generate)
        in_flight.start()
        deadline = time.monotonic() + 60
        while requests_received(env["NAME"], env) == received and time.monotonic() < deadline:
            time.sleep(0.2)
        stop_started = time.monotonic()
        printed = run_doc("Stop it", checkout, env, timeout=400)
        in_flight.join(timeout=600)
        response = answer["response"]
        progress(f"stop with a generation in flight: {response.status_code} {answer['at'] - stop_started:.1f} s "
                 f"after the stop began; the stop took {time.monotonic() - stop_started:.1f} s")
        assert answer["at"] > stop_started, "the generation ended before the stop: raise IN_FLIGHT_SECONDS"
        assert response.status_code == 200, response.text[:300]
        assert Image.open(io.BytesIO(response.content)).size == (SIDE, SIDE)
        assert printed.split()[-1] == "0", printed  # the container's exit code: a clean stop
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/ping", timeout=10)

        run_doc("Bake the model store in", checkout, env, timeout=600)
        baked = subprocess.run(["podman", "run", "--rm", "--entrypoint", "ls", "localhost/stable-diffusion-tiny:cpu",
                                "/mnt/models"], env=env, capture_output=True, text=True, timeout=120)
        assert baked.stdout.split() == [f"{MODEL}.mar"], baked.stdout + baked.stderr
    finally:
        subprocess.run(["podman", "rm", "--force", "--time", "0", env["NAME"]], env=env, capture_output=True)
