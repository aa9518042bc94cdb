#!/usr/bin/env python3
"""The serving image's main process: TorchServe behind nginx, and a stop that lets in-flight requests finish.

TorchServe on its own closes every connection when it is stopped, so a client whose generation is running gets
a connection reset (pytorch/serve#2008). Here nginx owns the container's port 8080 and TorchServe listens on
the loopback only. On SIGTERM (``podman stop``, Kubernetes' pod deletion):

1. nginx gets SIGQUIT: it closes its listener at once (a new client is refused, and the load balancer moves
   on), and waits for the requests in flight to get their answers (up to ``worker_shutdown_timeout``);
2. when nginx has exited, TorchServe is stopped (``torchserve --stop``), and this process exits 0.

If TorchServe or nginx exits on its own, the other is stopped and this process exits with an error, so the
container restarts. Arguments are passed on to ``torchserve --start``, e.g. ``--disable-token-auth`` where an
ingress does the access control. Settings (environment): ``TS_CONFIG`` (config.properties; its inference
address must be the one nginx forwards to), ``MODEL_STORE`` (the folder of .mar files), ``MODELS`` (``all``,
or ``name=file.mar`` pairs separated by commas). Logs of both servers go to the container's stdout and stderr.
"""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
NGINX_CONFIG = HERE / "nginx.conf"
UPSTREAM = "http://127.0.0.1:8085"  # nginx.conf's proxy_pass
TORCHSERVE_STOP_SECONDS = 90


def log(message: str) -> None:
    print(f"[entrypoint] {message}", flush=True)


def inference_address(config: Path) -> str:
    for line in config.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "inference_address":
            return value.strip()
    return ""


def torchserve_command(config: Path, extra: list[str]) -> list[str]:
    models = os.environ.get("MODELS", "all").replace(",", " ").split()
    return ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", str(config),
            "--model-store", os.environ.get("MODEL_STORE", "/mnt/models"), "--models", *models, *extra]


def main(argv: list[str]) -> int:
    config = Path(os.environ.get("TS_CONFIG", HERE / "config.properties"))
    if not config.is_file():
        log(f"TS_CONFIG={config}: no such file")
        return 2
    if inference_address(config) != UPSTREAM:
        log(f"{config}: inference_address must be {UPSTREAM} (nginx forwards port 8080 there), "
            f"not {inference_address(config) or 'unset'}")
        return 2
    Path("/tmp/nginx").mkdir(exist_ok=True)  # nginx.conf's temporary folders
    if os.environ.get("TMPDIR"):  # TorchServe's pid file and unpacked archives (an emptyDir in Kubernetes)
        Path(os.environ["TMPDIR"]).mkdir(parents=True, exist_ok=True)

    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())

    torchserve = subprocess.Popen(torchserve_command(config, argv))
    nginx = subprocess.Popen(["nginx", "-e", "stderr", "-c", str(NGINX_CONFIG)])
    log(f"nginx on :8080 forwarding to TorchServe at {UPSTREAM} (pids {nginx.pid}, {torchserve.pid})")
    while not stopping.wait(1):
        if torchserve.poll() is not None or nginx.poll() is not None:
            log(f"exited on its own: torchserve {torchserve.returncode}, nginx {nginx.returncode}; stopping")
            stop(nginx, torchserve)
            return 1

    log("stop asked: nginx refuses new connections and waits for the requests in flight")
    stop(nginx, torchserve)
    log("stopped")
    return 0


def stop(nginx: subprocess.Popen, torchserve: subprocess.Popen) -> None:
    """nginx first (its graceful quit drains the requests in flight), then TorchServe."""
    if nginx.poll() is None:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait()
        log("nginx has answered every request in flight and exited")
    if torchserve.poll() is None:
        subprocess.run(["torchserve", "--stop", "--foreground"], timeout=TORCHSERVE_STOP_SECONDS + 10)
        try:
            torchserve.wait(TORCHSERVE_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            torchserve.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
