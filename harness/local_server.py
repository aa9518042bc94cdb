"""Start and stop a TorchServe confined to one folder and free loopback ports (tests, benchmarks).

TorchServe writes logs/ and key_file.json into its working directory and its pid file, sockets and unpacked
models into TMPDIR; pointing all of them at one folder lets several servers run side by side and lets
a test prove that nothing is left behind.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil
import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
PORT_KEYS = ("inference", "management", "metrics", "grpc_inference", "grpc_management")


def free_ports(count: int) -> list[int]:
    """Ports that are free on 127.0.0.1 right now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def read_properties(path: Path) -> dict[str, str]:
    properties = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            properties[key.strip()] = value.strip()
    return properties


@dataclass
class LocalTorchServe:
    """One TorchServe started from the repository's config.properties, with ports and folders replaced.

    ``bin_dir`` is the environment whose ``torchserve`` (and so whose Python, for the workers) runs the server;
    by default the one running this code. With ``bin_dir`` set the server gets nothing of this environment:
    PYTHONPATH, PYTHONHOME and VIRTUAL_ENV are left out of its environment.
    """

    folder: Path
    model_store: Path
    models: dict[str, str]
    overrides: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    pid: Optional[int] = None
    bin_dir: Optional[Path] = None

    def __post_init__(self):
        self.folder = Path(self.folder)
        if self.bin_dir is not None:
            self.bin_dir = Path(self.bin_dir)
            if not (self.bin_dir / "torchserve").is_file():
                raise FileNotFoundError(f"no torchserve in {self.bin_dir}")
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "tmp").mkdir(exist_ok=True)
        self.ports = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS))))

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}"

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        tmp = str(self.folder / "tmp")
        env.update(TMPDIR=tmp, LOG_LOCATION=str(self.folder / "logs"), METRICS_LOCATION=str(self.folder / "logs"),
                   HF_HUB_OFFLINE="1")
        if self.bin_dir is not None:
            for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
                env.pop(name, None)
        env["PATH"] = f"{self.bin_dir or Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def write_config(self) -> Path:
        properties = read_properties(REPO_ROOT / "config.properties")
        properties.update({
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": self.metrics_url,
            "grpc_inference_port": str(self.ports["grpc_inference"]),
            "grpc_management_port": str(self.ports["grpc_management"]),
            "model_store": str(self.model_store),
            "vmargs": f"-Djava.io.tmpdir={self.folder / 'tmp'} -XX:-UsePerfData",
        })
        properties.update(self.overrides)
        path = self.folder / "config.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
        return path

    def launch(self) -> None:
        """Start TorchServe and return at once, while its frontend comes up and its workers load."""
        config = self.write_config()
        models = ",".join(f"{name}={archive}" for name, archive in self.models.items())
        command = [shutil.which("torchserve", path=self.environment()["PATH"]), "--start", "--ncs",
                   "--ts-config", str(config), "--model-store", str(self.model_store), "--models", models]
        with open(self.folder / "torchserve.out", "ab") as output:
            subprocess.run(command, cwd=self.folder, env=self.environment(), stdout=output, stderr=output, check=True)

    def start(self, timeout: float = 180.0) -> None:
        """Start TorchServe and wait until every model has a READY worker."""
        self.launch()
        self.wait_until_ready(timeout)

    def wait_until_ready(self, timeout: float = 180.0) -> None:
        """Wait until every model of a launched server has a READY worker; stop the server if it never does."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.pid = self._read_pid()
                if self.pid and all(self.ready_workers(name) >= 1 for name in self.models):
                    return
                if self.pid and not psutil.pid_exists(self.pid):
                    break
                time.sleep(0.5)
        except BaseException:  # never leave a started server behind, whatever went wrong while waiting
            self.stop()
            raise
        self.stop()
        raise RuntimeError(f"TorchServe did not get READY workers in {timeout:.0f} s; see {self.folder / 'logs'}")

    def _read_pid(self) -> Optional[int]:
        pid_file = self.folder / "tmp" / ".model_server.pid"
        try:
            return int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def keys(self) -> dict:
        """The tokens in key_file.json, which TorchServe rewrites in place (at start, on token renewal)."""
        for _ in range(50):
            try:
                return json.loads((self.folder / "key_file.json").read_text())
            except (OSError, json.JSONDecodeError):
                time.sleep(0.1)
        raise RuntimeError(f"no readable key_file.json in {self.folder}")

    def inference_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()['inference']['key']}"}

    def management_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()['management']['key']}"}

    def describe(self, name: str) -> dict:
        try:
            response = requests.get(f"{self.management_url}/models/{name}", headers=self.management_headers(),
                                    timeout=5)
        except (requests.RequestException, OSError, RuntimeError):  # not up yet, or key_file.json not written yet
            return {}
        return response.json()[0] if response.status_code == 200 else {}

    def ready_workers(self, name: str) -> int:
        return sum(worker.get("status") == "READY" for worker in self.describe(name).get("workers", []))

    def worker_pids(self, name: str) -> list[int]:
        return [worker["pid"] for worker in self.describe(name).get("workers", []) if worker.get("pid")]

    def processes(self) -> list[psutil.Process]:
        """The frontend and every process under it (the Python workers)."""
        if not self.pid or not psutil.pid_exists(self.pid):
            return []
        try:
            root = psutil.Process(self.pid)
            return [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 60.0) -> None:
        """Stop TorchServe and make sure no process of it is left, killing stragglers."""
        processes = self.processes()
        subprocess.run([shutil.which("torchserve", path=self.environment()["PATH"]), "--stop", "--foreground"],
                       cwd=self.folder, env=self.environment(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=timeout, check=False)
        _, alive = psutil.wait_procs(processes, timeout=10)
        kill_processes(alive)


def kill_processes(processes: list[psutil.Process]) -> None:
    """SIGKILL ``processes`` (those already gone are skipped) and wait until they are."""
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)
