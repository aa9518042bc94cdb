"""The Kubernetes probes (deploy/probe.py) against a real TorchServe with token authorization on.

The worker is frozen (SIGSTOP) as soon as it exists, seconds before it can have imported torch, so the test
holds the server in the state a probe must see as "alive, not ready" for as long as it needs; then it lets the
worker load and warm up and waits for readiness.
"""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from helpers import MODEL, REPO_ROOT, log_offset, wait_for_log

pytestmark = pytest.mark.serving

PROBE = REPO_ROOT / "deploy" / "probe.py"


def oldest_supported_python():
    """An interpreter of setup.py's python_requires minimum (3.10) that runs, if this machine has one (on PATH or
    installed by pyenv, whose shim on PATH may refuse to run it)."""
    installed = sorted(Path.home().glob(".pyenv/versions/3.10*/bin/python3.10"))
    candidates = [shutil.which("python3.10"), *map(str, installed)]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "pass"], capture_output=True, timeout=60).returncode == 0:
            return candidate
    return None


def probe(server, check: str, python: str = sys.executable, models: tuple[str, ...] = (MODEL,)) -> tuple[int, str]:
    """Run the probe as the kubelet would: a fresh process in the server's folder. ``models=()`` leaves out
    ``--model``, as the image's HEALTHCHECK does: every registered model must then have a READY worker."""
    named = [argument for model in models for argument in ("--model", model)]
    done = subprocess.run([python, str(PROBE), check, "--url", server.inference_url, "--management-url",
                           server.management_url, "--key-file", str(server.folder / "key_file.json"),
                           *named, "--timeout", "3"], capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout.strip()


def wait_until(condition, what: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.05)


def worker_process(server):
    """The model's worker process, once TorchServe has started it (None before)."""
    server.pid = server._read_pid()
    for process in server.processes():
        try:
            if any("model_service_worker" in part for part in process.cmdline()):
                return process
        except psutil.NoSuchProcess:
            pass
    return None


@pytest.fixture
def launched(tiny_mar, tmp_path):
    from harness.local_server import LocalTorchServe

    server = LocalTorchServe(tmp_path / "server", tiny_mar.parent, {MODEL: tiny_mar.name})
    yield server
    for process in server.processes():
        try:
            process.send_signal(signal.SIGCONT)
        except psutil.NoSuchProcess:
            pass
    server.stop()


def test_live_at_once_ready_only_after_the_worker_loaded_and_warmed_up(launched):
    server = launched
    assert probe(server, "live")[0] == 1 and probe(server, "ready")[0] == 1  # nothing is listening yet

    server.launch()
    worker = wait_until(lambda: worker_process(server), "a worker process")
    worker.send_signal(signal.SIGSTOP)
    offset = log_offset(server)
    assert server.ready_workers(MODEL) == 0

    wait_until(lambda: probe(server, "live")[0] == 0, "the frontend answering")
    status, said = probe(server, "live")
    assert "answered /ping (400)" in said  # asked without a key: the refusal is the sign of life
    status, said = probe(server, "ready")
    assert status == 1 and "no READY worker" in said, said
    status, said = probe(server, "ready", models=())  # /ping is already Healthy here: the model list decides
    assert status == 1 and f"model {MODEL} has no READY worker" in said, said
    assert requests.get(f"{server.inference_url}/ping", timeout=5).status_code == 400  # auth is still on

    worker.send_signal(signal.SIGCONT)
    wait_until(lambda: probe(server, "ready")[0] == 0, "readiness", timeout=300)
    assert server.ready_workers(MODEL) >= 1
    status, said = probe(server, "ready", models=())
    assert status == 0 and MODEL in said, said
    wait_for_log(server, r"warm-up generation at .* took", offset)
    assert probe(server, "live")[0] == 0


def test_ready_on_the_oldest_python_setup_allows(torchserve):
    # TorchServe writes the keys' expiration time with nanoseconds, which Python 3.10's fromisoformat refuses.
    python = oldest_supported_python()
    if python is None:
        pytest.skip("no Python 3.10 on this machine")
    status, said = probe(torchserve, "ready", python)
    assert status == 0 and said.startswith("ready"), said
