"""Several TorchServe nodes on one machine behind nginx, the local proof of scaling out (scripts/multinode.sh),
and the gateway that serves several models at one address.

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

Every node serves every model (``--model NAME=ARCHIVE``, repeatable; by default the one archive as
``stable_diffusion``). nginx's njs module (Debian's ``libnginx-mod-http-js``) routes by model at one address
(harness/gateway.js): the OpenAI routes ``/v1/images/...`` by the body's ``model`` and ``GET /v1/models``;
AUTOMATIC1111's ``/sdapi/v1/...`` by ``sd_model_checkpoint``. Clients send the gateway key as a Bearer token, or
A1111 clients as the password of HTTP Basic.

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
from typing import Optional

import psutil
import requests

from harness.local_server import LocalTorchServe, free_ports, kill_processes

MODEL = "stable_diffusion"
NGINX_TIMEOUT_S = 600  # generations can take minutes; as TorchServe's default_response_timeout
NJS_MODULE = Path("/usr/lib/nginx/modules/ngx_http_js_module.so")  # Debian's libnginx-mod-http-js
GATEWAY_JS = Path(__file__).resolve().parent / "gateway.js"
MAX_BODY = "32m"  # as TorchServe's max_request_size; bodies stay in memory so the gateway can read "model"
MAX_ANSWER = "64m"  # as TorchServe's max_response_size: the gateway holds a routed answer whole


@dataclass
class NodeState:
    folder: str
    ports: dict


@dataclass
class ClusterState:
    run_dir: str
    model_store: str
    models: dict  # model name -> archive file name in model_store
    port: int  # nginx: the address clients use
    gateway_ports: list  # one loopback nginx server per node, adding that node's key
    nodes: list
    started: int = 0  # Unix time the gateway started (the models' "created" in GET /v1/models)

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
        server = LocalTorchServe(Path(state.folder), Path(self.model_store), dict(self.models))
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


def njs_module() -> Path:
    if not NJS_MODULE.exists():
        raise RuntimeError(f"nginx's njs module is missing ({NJS_MODULE}): run scripts/setup.sh as root (it installs "
                           "Debian's libnginx-mod-http-js), or apt-get install libnginx-mod-http-js")
    return NJS_MODULE


def nginx_config(state: ClusterState, down: Optional[int] = None) -> str:
    """nginx.conf for the cluster: the front server, then one key-adding server per node.

    ``down``: a node taken out of the upstream while it restarts: its new key is not in this file yet, so a
    request sent there would be refused (TorchServe answers a stale key with 400); the others take its share.
    """
    run = Path(state.run_dir)
    keys = [state.node(index).keys()["inference"]["key"] if index != down else "restarting"
            for index in range(len(state.nodes))]
    upstream = "".join(f"        server 127.0.0.1:{port} max_fails=1 fail_timeout=10s{' down' * (index == down)};\n"
                       for index, port in enumerate(state.gateway_ports))
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
    to_nodes = f"""proxy_pass http://nodes;
            add_header X-Upstream $upstream_addr always;  # the node gateway(s) tried, in order
            # A node that refuses, resets or dies mid-request (its gateway answers 502): try the next node.
            proxy_next_upstream error timeout http_502 non_idempotent;
            proxy_next_upstream_tries {len(state.nodes)};"""
    return f"""# Written by harness/multinode.py; rewritten when a node restarts (its keys change).
load_module {njs_module()};
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
    client_max_body_size {MAX_BODY};
    client_body_buffer_size {MAX_BODY};
    proxy_read_timeout {NGINX_TIMEOUT_S}s;
    proxy_send_timeout {NGINX_TIMEOUT_S}s;
    proxy_buffering off;  # streams (NDJSON progress) go out as they come
    js_import gateway from {GATEWAY_JS};

    upstream nodes {{
{upstream}    }}

    server {{
        listen 127.0.0.1:{state.port};
        set $gateway_key "{state.gateway_key()}";
        set $gateway_models "{",".join(state.models)}";
        set $gateway_started "{state.started}";
        set $gateway_state "{run}/a1111_model";
        location / {{
            if ($http_authorization != "Bearer $gateway_key") {{
                return 401 '{{"error": "send the gateway key: Authorization: Bearer <{run}/gateway_key>"}}';
            }}
            {to_nodes}
        }}
        location = /v1/models {{ js_content gateway.openaiModels; }}
        location ~ ^/v1/images/(generations|edits)$ {{ js_content gateway.openaiImages; }}
        location ^~ /sdapi/v1/ {{ js_content gateway.a1111; }}
        location ^~ /_node/ {{  # the gateway's routed requests, to /predictions/{{model}}/1.0/...
            internal;
            rewrite ^/_node/(.*)$ /predictions/$1 break;
            subrequest_output_buffer_size {MAX_ANSWER};
            {to_nodes}
        }}
    }}
{node_servers}}}
"""


def write_and_reload_nginx(state: ClusterState, start: bool, down: Optional[int] = None) -> None:
    run = Path(state.run_dir)
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (run / "nginx-tmp" / name).mkdir(parents=True, exist_ok=True)
    conf = run / "nginx.conf"
    conf.write_text(nginx_config(state, down))
    conf.chmod(0o600)  # it holds the nodes' keys
    command = [nginx_binary(), "-p", str(run), "-c", str(conf)]
    subprocess.run(command + ["-t", "-q"], check=True)
    if start:
        subprocess.run(command, check=True)
        return
    old_workers = nginx_workers(state)
    subprocess.run(command + ["-s", "reload"], check=True)
    wait_until_reloaded(state, old_workers)


def nginx_workers(state: ClusterState) -> list[psutil.Process]:
    pid = nginx_pid(state)
    try:
        return psutil.Process(pid).children() if pid else []
    except psutil.NoSuchProcess:
        return []


def still_listening(worker: psutil.Process) -> bool:
    try:
        return any(connection.status == psutil.CONN_LISTEN for connection in worker.net_connections("tcp"))
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def wait_until_reloaded(state: ClusterState, old_workers: list[psutil.Process], timeout: float = 30.0) -> None:
    """Return once only workers with the new nginx.conf accept connections.

    ``nginx -s reload`` only signals the master. Until the master has started new workers and told the old ones
    to quit, the old ones still accept connections, on the front and on the node servers alike: a request could
    reach a restarted node through an old node server that still sends its previous key, and get a 400. An old
    worker closes its listening sockets as soon as it is told to quit, then finishes its requests in flight.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new_workers = [worker for worker in nginx_workers(state) if worker not in old_workers]
        if new_workers and not any(still_listening(worker) for worker in old_workers):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nginx did not take the new configuration in {timeout:.0f} s; see "
                       f"{Path(state.run_dir) / 'nginx-error.log'}")


def nginx_pid(state: ClusterState):
    try:
        return int((Path(state.run_dir) / "nginx.pid").read_text())
    except (OSError, ValueError):
        return None


def start(run_dir: Path, models: dict[str, Path], nodes: int, port: int = 0) -> ClusterState:
    """Start ``nodes`` TorchServe nodes serving ``models`` (name -> archive, all in one folder) and nginx in front;
    returns the cluster's state."""
    stores = {archive.resolve().parent for archive in models.values()}
    if len(stores) != 1:
        raise ValueError(f"every archive must be in one model store folder (TorchServe reads one), got "
                         f"{sorted(stores)}")
    njs_module()
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    key_file = run_dir / "gateway_key"
    key_file.write_text(secrets.token_urlsafe(24) + "\n")
    key_file.chmod(0o600)
    front, *gateways = free_ports(1 + nodes)
    state = ClusterState(str(run_dir), str(stores.pop()), {name: archive.name for name, archive in models.items()},
                         port or front, gateways, [], int(time.time()))
    for index in range(nodes):
        server = LocalTorchServe(run_dir / f"node{index + 1}", Path(state.model_store), dict(state.models))
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
    log(f"nginx on {state.url} in front of {nodes} node(s) serving {', '.join(state.models)}; clients send "
        f"Authorization: Bearer $(cat {key_file}) (A1111 clients: HTTP Basic with that key as the password)")
    return state


def kill_node(state: ClusterState, index: int) -> None:
    """SIGKILL every process of node ``index`` (its frontend and workers), as a machine failure would."""
    processes = state.node(index).processes()
    kill_processes(processes)
    log(f"killed node {index + 1} ({len(processes)} processes)")


def restart_node(state: ClusterState, index: int) -> None:
    """Start node ``index`` again on its ports, then give nginx its new key. Until then nginx holds the node out
    of the upstream: the restarted node draws a new key, and a request forwarded with the old one would get a 400."""
    node = state.node(index)
    if node.processes():
        raise RuntimeError(f"node {index + 1} is still running")
    write_and_reload_nginx(state, start=False, down=index)
    log(f"restarting node {index + 1} on 127.0.0.1:{node.ports['inference']} (nginx sends its requests to the "
        "other nodes meanwhile)")
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
                      "ready_workers": {name: node.ready_workers(name) if node.processes() else 0
                                        for name in state.models}})
    try:
        front = requests.get(f"{state.url}/ping", headers={"Authorization": f"Bearer {state.gateway_key()}"},
                             timeout=5).status_code
    except requests.RequestException:
        front = None
    return {"url": state.url, "models": list(state.models), "ping_through_nginx": front, "nodes": nodes}


def model_argument(parser: argparse.ArgumentParser, value: str) -> tuple[str, Path]:
    name, separator, archive = value.partition("=")
    if not separator or not name or "," in name or "/" in name or '"' in name:
        parser.error(f"--model takes NAME=ARCHIVE (a name without commas, slashes or quotes), got {value!r}")
    return name, Path(archive)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/multinode.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("run/multinode"))
    commands = parser.add_subparsers(dest="command", required=True)
    begin = commands.add_parser("start", help="start the nodes and nginx")
    begin.add_argument("--nodes", type=int, default=2)
    begin.add_argument("--archive", type=Path, default=Path("model_store/stable_diffusion.mar"),
                       help=f"the one model, served as {MODEL} (without --model)")
    begin.add_argument("--model", action="append", default=[], metavar="NAME=ARCHIVE",
                       help="a model to serve under NAME (repeat for several; the archives in one folder)")
    begin.add_argument("--port", type=int, default=0, help="nginx's port on 127.0.0.1 (default: a free one)")
    commands.add_parser("stop", help="stop nginx and every node")
    commands.add_parser("status", help="print the nodes' state as JSON")
    for name, what in (("kill-node", "SIGKILL one node"), ("restart-node", "start a stopped node again")):
        command = commands.add_parser(name, help=what)
        command.add_argument("node", type=int, help="1-based")
    args = parser.parse_args(argv)
    if args.command == "start":
        models = dict(model_argument(parser, value) for value in args.model) or {MODEL: args.archive}
        for archive in models.values():
            if not archive.is_file():
                parser.error(f"no archive at {archive}: build one with ./build_mar.sh --tiny")
        state = start(args.run_dir, models, args.nodes, args.port)
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
