"""Two TorchServe nodes behind nginx (scripts/multinode.sh): a node killed mid-load loses no request.

Real parts throughout: two TorchServes from the tiny .mar, Debian's nginx (scripts/setup.sh installs it; the
test fails, never skips, without it), SIGKILL on every process of one node. nginx adds ``X-Upstream``: the
node gateways it tried for a request, in order, so the test knows which node answered each request.
"""

import json
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import pytest
import requests

from harness.multinode import ClusterState
from helpers import MODEL, REPO_ROOT, SMALL

pytestmark = pytest.mark.serving

SCRIPT = REPO_ROOT / "scripts" / "multinode.sh"
LOAD = 8  # requests in the bounded load
CONCURRENCY = 4  # the first wave: in flight when node 1 is killed
KILL_AFTER = 2  # answers received before node 1 is killed


def multinode(run_dir, *arguments) -> None:
    subprocess.run([str(SCRIPT), "--run-dir", str(run_dir), *arguments], check=True, timeout=600)


@pytest.fixture(scope="module")
def cluster(tiny_mar, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("multinode")
    try:
        multinode(run_dir, "start", "--nodes", "2", "--archive", str(tiny_mar))
        yield ClusterState.load(run_dir)
    finally:
        if (run_dir / "state.json").exists():
            multinode(run_dir, "stop")


def generate(state: ClusterState, seed: int) -> requests.Response:
    return requests.post(f"{state.url}/predictions/{MODEL}", timeout=600,
                         headers={"Authorization": f"Bearer {state.gateway_key()}"},
                         json={"prompt": "a lighthouse", "seed": seed, "output_format": "png", **SMALL})


def node_of(state: ClusterState, response: requests.Response) -> int:
    """The 1-based node that answered: the last gateway nginx tried."""
    last = response.headers["X-Upstream"].split(",")[-1].strip()
    return state.gateway_ports.index(int(last.rsplit(":", 1)[1])) + 1


def test_a_node_killed_mid_load_loses_no_request_and_rejoins_after_restart(cluster):
    state = cluster
    assert requests.post(f"{state.url}/predictions/{MODEL}", data="a cat", timeout=30).status_code == 401

    killed = threading.Event()

    def send(seed: int) -> requests.Response:
        """The first wave goes at once; the rest only once node 1 is dead, so they must all reach node 2."""
        if seed >= CONCURRENCY:
            assert killed.wait(timeout=600), "node 1 was never killed"
        return generate(state, seed)

    answers = {}
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = {pool.submit(send, seed): seed for seed in range(LOAD)}
        for future in as_completed(futures):
            answers[futures[future]] = future.result()
            if len(answers) == KILL_AFTER:
                multinode(state.run_dir, "kill-node", "1")
                killed.set()
    sent_after_kill = set(range(CONCURRENCY, LOAD))

    assert sorted(answers) == list(range(LOAD))
    assert {seed: response.status_code for seed, response in answers.items()} == dict.fromkeys(range(LOAD), 200)
    assert all(response.headers["X-Seeds"] == str(seed) for seed, response in answers.items())
    assert {node_of(state, answers[seed]) for seed in sent_after_kill} == {2}
    front = [line for line in open(f"{state.run_dir}/nginx-access.log") if "POST /predictions" in line]
    statuses = sorted(line.split('" ', 1)[1].split()[0] for line in front)
    assert statuses == ["200"] * LOAD + ["401"]  # one answer per request (and the keyless one refused), no repeats
    retried = [seed for seed, response in answers.items() if "," in response.headers["X-Upstream"]]
    print(json.dumps({"load": LOAD, "sent_after_kill": len(sent_after_kill), "retried_on_node_2": retried}))

    multinode(state.run_dir, "restart-node", "1")
    rejoined = [generate(state, 100 + index) for index in range(4)]  # sequential: round robin alternates
    assert [response.status_code for response in rejoined] == [200] * 4
    assert {node_of(state, response) for response in rejoined} == {1, 2}
