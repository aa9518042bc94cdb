#!/usr/bin/env python3
"""The gateway's cost per request: the same requests sent to a node directly and through the gateway.

    python benchmarks/gateway.py            # 20 rounds
    python benchmarks/gateway.py --quick    # 5 rounds

One TorchServe node serves the tiny .mar under two names behind the gateway (scripts/multinode.sh, nginx with
njs). Each round sends, in turn, so that a slow spell of the machine hits every way alike: an A1111 txt2img and
an OpenAI generation (64x64, 2 steps) and a GET samplers (no generation: the routing cost alone), each once
straight to the node (its key, /predictions/MODEL/1.0/...) and once through the gateway (the gateway key; the
model chosen from the body). The table gives median latencies and the gateway's extra milliseconds. These are
tiny-model figures: a real model's generation takes seconds, so the same milliseconds are a smaller share.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.report import Row, markdown_table, median, write_json  # noqa: E402
from benchmarks.run import build_mar, progress  # noqa: E402
from harness import multinode  # noqa: E402

MODELS = ("sd-a", "sd-b")
A1111_BODY = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 1}
OPENAI_BODY = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 2, "seed": 1}


def ways(state: multinode.ClusterState) -> dict:
    """name -> (method, url, JSON body, headers): each request straight to the node and through the gateway."""
    node = state.node(0)
    direct = {"Authorization": f"Bearer {node.keys()['inference']['key']}"}
    gateway = {"Authorization": f"Bearer {state.gateway_key()}"}
    model = f"{node.inference_url}/predictions/{MODELS[0]}/1.0"
    return {
        "A1111 txt2img, direct": ("POST", f"{model}/sdapi/v1/txt2img", A1111_BODY, direct),
        "A1111 txt2img, gateway": ("POST", f"{state.url}/sdapi/v1/txt2img",
                                   {**A1111_BODY, "override_settings": {"sd_model_checkpoint": MODELS[0]}}, gateway),
        "OpenAI generation, direct": ("POST", f"{model}/v1/images/generations", OPENAI_BODY, direct),
        "OpenAI generation, gateway": ("POST", f"{state.url}/v1/images/generations",
                                       {**OPENAI_BODY, "model": MODELS[0]}, gateway),
        "GET samplers, direct": ("GET", f"{model}/sdapi/v1/samplers", None, direct),
        "GET samplers, gateway": ("GET", f"{state.url}/sdapi/v1/samplers", None, gateway),
    }


def timed(session: requests.Session, method: str, url: str, body, headers: dict) -> float:
    started = time.perf_counter()
    response = session.request(method, url, json=body, headers=headers, timeout=600)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{method} {url}: {response.status_code} {response.text[:300]}")
    return elapsed


def measure(state: multinode.ClusterState, rounds: int) -> dict[str, list[float]]:
    requests_of = ways(state)
    samples = {name: [] for name in requests_of}
    with requests.Session() as session:
        for round_number in range(rounds + 1):
            progress("warm-up round" if round_number == 0 else f"round {round_number}/{rounds}")
            for name, (method, url, body, headers) in requests_of.items():
                elapsed = timed(session, method, url, body, headers)
                if round_number:
                    samples[name].append(elapsed)
    return samples


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds: to check the script")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "gateway.json")
    arguments = parser.parse_args(argv)
    rounds = 5 if arguments.quick else 20
    with tempfile.TemporaryDirectory(prefix="sd-gateway-bench-") as folder:
        work = Path(folder)
        progress("building the tiny .mar with build_mar.sh")
        build_mar(work, "build", "--tiny", "--export-path", work / "store", "--work-dir", work / "scratch")
        archive = work / "store" / "stable_diffusion.mar"
        progress("starting one node serving two models behind the gateway")
        state = multinode.start(work / "cluster", {name: archive for name in MODELS}, nodes=1)
        try:
            samples = measure(state, rounds)
        finally:
            multinode.stop(state)
    rows = []
    for kind in ("A1111 txt2img", "OpenAI generation", "GET samplers"):
        group = f"{kind} (tiny model, 64x64, 2 steps)" if "GET" not in kind else kind
        direct, through = samples[f"{kind}, direct"], samples[f"{kind}, gateway"]
        rows += [Row(group, "direct to the node", median(direct) * 1000, "ms", rounds, samples=direct),
                 Row(group, "through the gateway", median(through) * 1000, "ms", rounds, samples=through),
                 Row(group, "gateway - direct", (median(through) - median(direct)) * 1000, "ms", rounds)]
    print()
    print(markdown_table(rows))
    write_json(arguments.output, rows, {"mode": "quick" if arguments.quick else "full", "rounds": rounds,
                                        "model": "tiny (build_mar.sh --tiny), one node, two model names"})
    progress(f"wrote {arguments.output}")


if __name__ == "__main__":
    main()
