#!/usr/bin/env python3
"""Lay out model_store/*.mar as KServe's TorchServe runtime reads its storageUri.

    python3 deploy/kserve/layout.py --model-store model_store --output kserve-storage
    # then copy kserve-storage/ to the bucket or volume the InferenceService's storageUri names

writes ``OUTPUT/model-store/<name>.mar`` (copies) and ``OUTPUT/config/config.properties``, which lists every
archive in ``model_snapshot`` (the runtime's front reads the model names from there) and keeps TorchServe on the
pod's loopback. Token authorization is off in this layout because KServe's front forwards to TorchServe
without TorchServe's keys and checks readiness through its management API; TorchServe listens on 127.0.0.1
only, so nothing outside the pod reaches it, and access control belongs to KServe's ingress. Environment
configuration stays off, so a ``TS_SERVICE_ENVELOPE`` set by the runtime is ignored: the handler reads v1 and
v2 bodies per request itself.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

PORT = 8085  # where KServe's TorchServe front expects TorchServe (its default inference address)
WORKER_SETTINGS = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 100, "responseTimeout": 600}


def config_properties(names: list[str]) -> str:
    snapshot = {"name": "startup.cfg", "modelCount": len(names),
                "models": {name: {"1.0": {"defaultVersion": True, "marName": f"{name}.mar", **WORKER_SETTINGS}}
                           for name in names}}
    return "\n".join([
        "# Written by deploy/kserve/layout.py for KServe's TorchServe runtime (storageUri mounted at /mnt/models).",
        f"inference_address=http://127.0.0.1:{PORT}",
        f"management_address=http://127.0.0.1:{PORT}",
        "metrics_address=http://0.0.0.0:8082",
        "grpc_inference_address=127.0.0.1",
        "grpc_management_address=127.0.0.1",
        "disable_token_authorization=true",
        "enable_model_api=false",
        "enable_envvars_config=false",
        "model_store=/mnt/models/model-store",
        "load_models=all",
        f"model_snapshot={json.dumps(snapshot)}",
        "max_response_size=67108864",
        "max_request_size=33554432",
        "default_response_timeout=600",
        "default_startup_timeout=600",
        "metrics_mode=prometheus",
        "install_py_dep_per_model=false",
    ]) + "\n"


def lay_out(model_store: Path, output: Path) -> list[str]:
    archives = sorted(model_store.glob("*.mar"))
    if not archives:
        raise SystemExit(f"layout: no .mar in {model_store}: build one with ./build_mar.sh first")
    (output / "model-store").mkdir(parents=True, exist_ok=True)
    (output / "config").mkdir(parents=True, exist_ok=True)
    for archive in archives:
        print(f"layout: copying {archive} ({archive.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
        shutil.copy2(archive, output / "model-store" / archive.name)
    names = [archive.stem for archive in archives]
    (output / "config" / "config.properties").write_text(config_properties(names))
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    names = lay_out(args.model_store, args.output)
    print(f"layout: {args.output}/config/config.properties serves {', '.join(names)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
