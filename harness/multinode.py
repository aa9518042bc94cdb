"""Several TorchServe nodes on one machine behind nginx, the local proof of scaling out (scripts/multinode.sh).

Each node is a LocalTorchServe in its own folder: its own loopback ports, logs, key file and java.io.tmpdir
(worker sockets are ``.ts.sock.<port>`` files there; two servers sharing one collide). nginx (Debian's) is
the load balancer: round robin over the nodes, and a request whose node fails (connection refused or reset:
the node died, even mid-request) is sent again to the next node (``proxy_next_upstream ... non_idempotent``:
a generation with a seed gives the same image wherever it runs, so trying again is safe).

Token authorization stays on in every node. TorchServe draws each node's keys at random (0.12 has no setting
for them), so no client key fits two nodes: nginx is the gateway that holds them. Clients send one gateway key
(``gateway_key``, mode 0600, made here); nginx checks it and forwards each request through a small loopback
server per node that adds that node's own inference key. A restarted node draws new keys, so restarting a
node re-renders nginx.conf and reloads nginx.

The state (ports, folders) lives in ``<run_dir>/state.json`` so that ``stop`` and ``restart-node`` work from
another process.
"""

import argparse
import getpass
import json
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import requests

from harness.local_server import LocalTorchServe, free_ports, kill_processes

MODEL = "stable_diffusion"
NGINX_TIMEOUT_S = 600  # generations can take minutes; as TorchServe's default_response_timeout


@dataclass
class NodeState:
    folder: str
    ports: dict


@dataclass
class ClusterState:
    run_dir: str
    model_store: str
    archive: str
    port: int  # nginx: the address clients use
    gateway_ports: list  # one loopback nginx server per node, adding that node's key
    nodes: list

    def save(self) -> None:
        (Path(self.run_dir) / "state.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> "ClusterState":
        data = json.loads((Path(run_dir) / "state.json").read_text())
        return cls(**{**data, "nodes": [NodeState(**node) for node in data["nodes"]]})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def node(self, index: int) -> LocalTorchServe:
        """Node ``index`` (0-based) as a LocalTorchServe on its recorded ports."""
        state = self.nodes[index]
        server = LocalTorchServe(Path(state.folder), Path(self.model_store), {MODEL: self.archive})
        server.ports = dict(state.ports)
        server.pid = server._read_pid()
        return server

    def gateway_key(self) -> str:
        return (Path(self.run_dir) / "gateway_key").read_text().strip()


def log(message: str) -> None:
    print(f"[multinode] {message}", file=sys.stderr, flush=True)


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((path for path in ("/usr/sbin/nginx",) if Path(path).exists()), None)
    if found is None:
        raise RuntimeError("nginx is not installed: run scripts/setup.sh as root (it installs Debian's nginx), or "
                           "apt-get install nginx")
    return found


def nginx_config(state: ClusterState) -> str:
    """nginx.conf for the cluster: the front server, then one key-adding server per node."""
    run = Path(state.run_dir)
    keys = [state.node(index).keys()["inference"]["key"] for index in range(len(state.nodes))]
    upstream = "".join(f"        server 127.0.0.1:{port} max_fails=1 fail_timeout=10s;\n"
                       for port in state.gateway_ports)
    node_servers = "".join(f"""
    server {{
        listen 127.0.0.1:{gateway};
        access_log {run}/nginx-nodes.log upstreams;
        location / {{
            proxy_pass http://127.0.0.1:{node.ports['inference']};
            proxy_set_header Authorization "Bearer {key}";
        }}
    }}
""" for gateway, node, key in zip(state.gateway_ports, state.nodes, keys))
    return f"""# Written by harness/multinode.py; rewritten when a node restarts (its keys change).
user {getpass.getuser()};
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format upstreams '$request_time "$request" $status upstreams=$upstream_addr statuses=$upstream_status';
    access_log {run}/nginx-access.log upstreams;  # the clients' requests (the node servers log apart)
    client_body_temp_path {run}/nginx-tmp/body;
    proxy_temp_path {run}/nginx-tmp/proxy;
    fastcgi_temp_path {run}/nginx-tmp/fastcgi;
    uwsgi_temp_path {run}/nginx-tmp/uwsgi;
    scgi_temp_path {run}/nginx-tmp/scgi;
    client_max_body_size 32m;
    proxy_read_timeout {NGINX_TIMEOUT_S}s;
    proxy_send_timeout {NGINX_TIMEOUT_S}s;
    proxy_buffering off;  # streams (NDJSON progress) go out as they come

    upstream nodes {{
{upstream}    }}

    server {{
        listen 127.0.0.1:{state.port};
        location / {{
            if ($http_authorization != "Bearer {state.gateway_key()}") {{
                return 401 '{{"error": "send the gateway key: Authorization: Bearer <{run}/gateway_key>"}}';
            }}
            proxy_pass http://nodes;
            add_header X-Upstream $upstream_addr always;  # the node gateway(s) tried, in order
            # A node that refuses, resets or dies mid-request (its gateway answers 502): try the next node.
            proxy_next_upstream error timeout http_502 non_idempotent;
            proxy_next_upstream_tries {len(state.nodes)};
        }}
    }}
{node_servers}}}
"""


def write_and_reload_nginx(state: ClusterState, start: bool) -> None:
    run = Path(state.run_dir)
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (run / "nginx-tmp" / name).mkdir(parents=True, exist_ok=True)
    conf = run / "nginx.conf"
    conf.write_text(nginx_config(state))
    conf.chmod(0o600)  # it holds the nodes' keys
    command = [nginx_binary(), "-p", str(run), "-c", str(conf)]
    subprocess.run(command + ["-t", "-q"], check=True)
    subprocess.run(command if start else command + ["-s", "reload"], check=True)


def nginx_pid(state: ClusterState):
    try:
        return int((Path(state.run_dir) / "nginx.pid").read_text())
    except (OSError, ValueError):
        return None


def start(run_dir: Path, archive: Path, nodes: int, port: int = 0) -> ClusterState:
    """Start ``nodes`` TorchServe nodes serving ``archive`` and nginx in front; returns the cluster's state."""
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    key_file = run_dir / "gateway_key"
    key_file.write_text(secrets.token_urlsafe(24) + "\n")
    key_file.chmod(0o600)
    front, *gateways = free_ports(1 + nodes)
    state = ClusterState(str(run_dir), str(archive.resolve().parent), archive.name, port or front, gateways, [])
    for index in range(nodes):
        server = LocalTorchServe(run_dir / f"node{index + 1}", archive.resolve().parent, {MODEL: archive.name})
        state.nodes.append(NodeState(str(server.folder), server.ports))
    state.save()
    servers = [state.node(index) for index in range(nodes)]
    for index, server in enumerate(servers):
        log(f"starting node {index + 1} of {nodes} on {server.inference_url}")
        server.launch()
    for index, server in enumerate(servers):
        log(f"waiting for node {index + 1}'s worker to load and warm up (5-60 s)")
        try:
            server.wait_until_ready(timeout=300)
        except BaseException:
            stop(state)
            raise
    write_and_reload_nginx(state, start=True)
    log(f"nginx on {state.url} in front of {nodes} node(s); clients send Authorization: Bearer "
        f"$(cat {key_file})")
    return state


def kill_node(state: ClusterState, index: int) -> None:
    """SIGKILL every process of node ``index`` (its frontend and workers), as a machine failure would."""
    processes = state.node(index).processes()
    kill_processes(processes)
    log(f"killed node {index + 1} ({len(processes)} processes)")


def restart_node(state: ClusterState, index: int) -> None:
    """Start node ``index`` again on its ports, then give nginx its new key."""
    node = state.node(index)
    if node.processes():
        raise RuntimeError(f"node {index + 1} is still running")
    log(f"restarting node {index + 1} on 127.0.0.1:{node.ports['inference']}")
    node.start(timeout=300)
    write_and_reload_nginx(state, start=False)
    log(f"node {index + 1} is back behind nginx")


def stop(state: ClusterState) -> None:
    pid = nginx_pid(state)
    if pid and psutil.pid_exists(pid):
        conf = Path(state.run_dir) / "nginx.conf"
        subprocess.run([nginx_binary(), "-p", state.run_dir, "-c", str(conf), "-s", "quit"], check=False)
        deadline = time.monotonic() + 20
        while psutil.pid_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    for index in range(len(state.nodes)):
        node = state.node(index)
        if node.processes():
            log(f"stopping node {index + 1}")
            node.stop()


def status(state: ClusterState) -> dict:
    nodes = []
    for index in range(len(state.nodes)):
        node = state.node(index)
        nodes.append({"node": index + 1, "inference": node.inference_url,
                      "ready_workers": node.ready_workers(MODEL) if node.processes() else 0})
    try:
        front = requests.get(f"{state.url}/ping", headers={"Authorization": f"Bearer {state.gateway_key()}"},
                             timeout=5).status_code
    except requests.RequestException:
        front = None
    return {"url": state.url, "ping_through_nginx": front, "nodes": nodes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/multinode.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("run/multinode"))
    commands = parser.add_subparsers(dest="command", required=True)
    begin = commands.add_parser("start", help="start the nodes and nginx")
    begin.add_argument("--nodes", type=int, default=2)
    begin.add_argument("--archive", type=Path, default=Path("model_store/stable_diffusion.mar"))
    begin.add_argument("--port", type=int, default=0, help="nginx's port on 127.0.0.1 (default: a free one)")
    commands.add_parser("stop", help="stop nginx and every node")
    commands.add_parser("status", help="print the nodes' state as JSON")
    for name, what in (("kill-node", "SIGKILL one node"), ("restart-node", "start a stopped node again")):
        command = commands.add_parser(name, help=what)
        command.add_argument("node", type=int, help="1-based")
    args = parser.parse_args(argv)
    if args.command == "start":
        if not args.archive.is_file():
            parser.error(f"no archive at {args.archive}: build one with ./build_mar.sh --tiny")
        state = start(args.run_dir, args.archive, args.nodes, args.port)
        print(json.dumps(status(state), indent=2))
        return 0
    state = ClusterState.load(args.run_dir)
    if args.command == "stop":
        stop(state)
    elif args.command == "status":
        print(json.dumps(status(state), indent=2))
    elif args.command == "kill-node":
        kill_node(state, args.node - 1)
    else:
        restart_node(state, args.node - 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
