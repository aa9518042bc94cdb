"""Requests per second through nginx in front of one TorchServe node and in front of two (scripts/multinode.sh).

The same bounded load (ROUNDS x REQUESTS requests, CONCURRENCY at a time, each with its own seed) goes through
the same nginx gateway to one node, then to two. Each node runs one worker with one torch thread, so a node
stands for one machine's worth of compute (on a 2-core machine, two nodes use both cores); the ratio is the
number that matters, not the absolute rate. Writes benchmarks/results/multinode.json.
"""

import argparse
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.report import Row, at_least, markdown_table, median, write_json  # noqa: E402
from benchmarks.run import build_mar, progress  # noqa: E402
from harness import multinode  # noqa: E402

MODEL = "stable_diffusion"
CONCURRENCY = 4


def one_node_per_core_config(work: Path) -> Path:
    """The shipped model-config.yaml with one worker of one torch thread (and no warm-up at 768x768)."""
    config = yaml.safe_load((REPO_ROOT / "model-config.yaml").read_text())
    config.update(minWorkers=1, maxWorkers=1)
    config["handler"] = {**(config.get("handler") or {}), "torch_threads": 1, "warmup": False}
    path = work / "model-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def requests_per_second(state: multinode.ClusterState, body: dict, count: int) -> tuple[float, Counter]:
    """The rate of ``count`` requests, and how many each node gateway answered (a retry would show as two)."""
    headers = {"Authorization": f"Bearer {state.gateway_key()}"}

    def send(seed: int) -> str:
        response = requests.post(f"{state.url}/predictions/{MODEL}", json={**body, "seed": seed}, headers=headers,
                                 timeout=600)
        response.raise_for_status()
        return response.headers["X-Upstream"]

    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        upstreams = list(pool.map(send, range(count)))
    return count / (time.perf_counter() - started), Counter(upstreams)


def measure(archive: Path, work: Path, nodes: int, body: dict, count: int, rounds: int) -> list[float]:
    progress(f"starting {nodes} node(s) behind nginx")
    state = multinode.start(work / f"cluster-{nodes}", {MODEL: archive}, nodes)
    try:
        requests_per_second(state, body, CONCURRENCY)  # every worker has run once
        samples = []
        for round_number in range(rounds):
            rate, upstreams = requests_per_second(state, body, count)
            samples.append(rate)
            progress(f"{nodes} node(s), round {round_number + 1}/{rounds}: {rate:.2f} requests/s, answered by "
                     f"{dict(upstreams)}")
        return samples
    finally:
        multinode.stop(state)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64x64, 2 steps, 8 requests, 1 round")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "multinode.json")
    arguments = parser.parse_args(argv)
    side, steps, count, rounds = (64, 2, 8, 1) if arguments.quick else (256, 10, 16, 3)
    body = {"prompt": "a lighthouse at dusk", "width": side, "height": side, "num_inference_steps": steps,
            "output_format": "png"}
    with tempfile.TemporaryDirectory(prefix="sd-multinode-bench-") as folder:
        work = Path(folder)
        progress("building the tiny .mar (one worker, one torch thread) with build_mar.sh")
        build_mar(work, "build", "--tiny", "--config-file", one_node_per_core_config(work), "--export-path",
                  work / "store", "--work-dir", work / "scratch")
        archive = work / "store" / f"{MODEL}.mar"
        one = measure(archive, work, 1, body, count, rounds)
        two = measure(archive, work, 2, body, count, rounds)
    group = f"{count} requests {side}x{side} {steps} steps, {CONCURRENCY} concurrent, through nginx"
    rows = [Row(group, "one node", median(one), "requests/s", rounds, samples=one),
            Row(group, "two nodes", median(two), "requests/s", rounds, samples=two),
            Row(group, "two nodes / one node", median(two) / median(one), "x", rounds, at_least(1.5))]
    print()
    print(markdown_table(rows))
    write_json(arguments.output, rows, {"mode": "quick" if arguments.quick else "full", "side": side,
                                        "steps": steps, "requests": count, "rounds": rounds,
                                        "concurrency": CONCURRENCY})
    progress(f"wrote {arguments.output}")


if __name__ == "__main__":
    main()
