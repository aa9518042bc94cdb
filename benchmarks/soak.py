"""Bounded soak: 8 concurrent clients send a mix of valid and invalid requests to a real TorchServe.

Checks what a long-running service must keep doing: every request answered with the status it deserves,
none lost, no worker restarted, and worker memory flat (growth between the first and the last part of the
run). Loopback only; the run stops by itself after --duration seconds. Prints a table and writes JSON.

    python benchmarks/soak.py --duration 180          # the figures in docs/operations.md
    python benchmarks/soak.py --duration 30           # the short mode CI runs (tests/test_soak.py)
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from harness.local_server import LocalTorchServe  # noqa: E402

VALID = [
    {"prompt": "a cat", "num_inference_steps": 2, "width": 64, "height": 64},
    {"prompt": "a dog", "num_inference_steps": 3, "width": 96, "height": 64, "output_format": "png"},
    {"prompt": "a fox", "num_inference_steps": 2, "width": 64, "height": 64, "num_images": 2, "output_format": "json"},
]
INVALID = [
    {"prompt": "a cat", "width": 770},
    {"prompt": "", "num_inference_steps": 2},
    {"prompt": "a cat", "guidance_scale": "high"},
    {"prompt": "a cat", "unknown_field": 1},
    {"prompt": "a cat", "image": "not base64"},
]


@dataclass
class SoakReport:
    duration_s: float
    clients: int
    requests: int = 0
    valid_ok: int = 0
    invalid_rejected: int = 0
    wrong_status: int = 0
    lost: int = 0
    worker_restarts: int = 0
    rss_first_mb: float = 0.0
    rss_last_mb: float = 0.0
    rss_growth_percent: float = 0.0
    requests_per_second: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (self.wrong_status == 0 and self.lost == 0 and self.worker_restarts == 0
                and self.rss_growth_percent < 10.0 and self.requests > 0)


def build_archive(work: Path) -> Path:
    store = work / "store"
    subprocess.run([str(REPO_ROOT / "build_mar.sh"), "--tiny", "--force", "--export-path", str(store), "--work-dir",
                    str(work / "scratch")], check=True, env={**os.environ, "PYTHON": sys.executable})
    return store


def worker_rss_mb(server: LocalTorchServe) -> float:
    total = 0
    for pid in server.worker_pids("stable_diffusion"):
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def client_loop(server: LocalTorchServe, deadline: float, seed: int, report: SoakReport, lock: threading.Lock):
    generator = random.Random(seed)
    session = requests.Session()
    headers = {**server.inference_headers(), "Content-Type": "application/json"}
    while time.monotonic() < deadline:
        valid = generator.random() < 0.75
        body = dict(generator.choice(VALID if valid else INVALID), seed=generator.randrange(2**31))
        try:
            response = session.post(f"{server.inference_url}/predictions/stable_diffusion", data=json.dumps(body),
                                    headers=headers, timeout=120)
            status = response.status_code
        except requests.RequestException as error:
            with lock:
                report.requests += 1
                report.lost += 1
                report.errors.append(f"{type(error).__name__}: {error}"[:200])
            continue
        with lock:
            report.requests += 1
            if valid and status == 200:
                report.valid_ok += 1
            elif not valid and 400 <= status < 500:
                report.invalid_rejected += 1
            else:
                report.wrong_status += 1
                report.errors.append(f"{'valid' if valid else 'invalid'} request got {status}: {response.text[:120]}")


def run_soak(duration: float, clients: int = 8, work: Path | None = None) -> SoakReport:
    """Build the tiny archive, start TorchServe, run the clients for ``duration`` seconds, stop."""
    work = Path(work or tempfile.mkdtemp(prefix="soak-"))
    store = build_archive(work)
    server = LocalTorchServe(work / "server", store, {"stable_diffusion": "stable_diffusion.mar"})
    print(f"[soak] starting TorchServe in {work / 'server'}", flush=True)
    server.start()
    report = SoakReport(duration_s=duration, clients=clients)
    try:
        pids = sorted(server.worker_pids("stable_diffusion"))
        lock = threading.Lock()
        started = time.monotonic()
        deadline = started + duration
        threads = [threading.Thread(target=client_loop, args=(server, deadline, seed, report, lock))
                   for seed in range(clients)]
        for thread in threads:
            thread.start()
        samples = []
        while any(thread.is_alive() for thread in threads):
            samples.append((time.monotonic() - started, worker_rss_mb(server)))
            print(f"[soak] {samples[-1][0]:5.0f} s  {report.requests} requests  worker RSS {samples[-1][1]:.0f} MB",
                  flush=True)
            time.sleep(min(5.0, duration / 10))
        for thread in threads:
            thread.join()
        window = min(60.0, duration / 3)
        first = [rss for at, rss in samples if at <= window] or [samples[0][1]]
        last = [rss for at, rss in samples if at >= duration - window] or [samples[-1][1]]
        report.rss_first_mb = round(sum(first) / len(first), 1)
        report.rss_last_mb = round(sum(last) / len(last), 1)
        report.rss_growth_percent = round(100 * (report.rss_last_mb / report.rss_first_mb - 1), 2)
        report.requests_per_second = round(report.requests / duration, 2)
        report.worker_restarts = len(set(pids) - set(server.worker_pids("stable_diffusion")))
    finally:
        server.stop()
    return report


def print_table(report: SoakReport) -> None:
    rows = [
        ("duration", f"{report.duration_s:.0f} s, {report.clients} clients"),
        ("requests answered", f"{report.requests} ({report.requests_per_second}/s)"),
        ("valid -> 200", report.valid_ok),
        ("invalid -> 4xx", report.invalid_rejected),
        ("wrong status", report.wrong_status),
        ("lost (no answer)", report.lost),
        ("worker restarts", report.worker_restarts),
        ("worker RSS first/last", f"{report.rss_first_mb} / {report.rss_last_mb} MB"),
        ("RSS growth (target < 10%)", f"{report.rss_growth_percent}%"),
        ("result", "PASS" if report.passed else "FAIL"),
    ]
    print("| soak | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "soak.json")
    arguments = parser.parse_args()
    report = run_soak(arguments.duration, arguments.clients)
    print_table(report)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps({**asdict(report), "passed": report.passed}, indent=2))
    print(f"[soak] wrote {arguments.output}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
