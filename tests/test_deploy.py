"""Every manifest in deploy/ against the Kubernetes schemas (kubernetes-validate, offline), and how they fit.

The InferenceService is KServe's custom resource, whose schema Kubernetes does not ship: its KServe-only keys
are checked by name here, and everything else in it (the predictor's pod fields, the model's container fields)
is validated as the Pod it becomes. The KServe layout script runs on a model store with a stand-in archive
(it only copies the file and names it in the config).
"""

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from helpers import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
KUBERNETES_VERSION = "1.37"
# KServe v1beta1 keys that are not Pod or Container fields.
KSERVE_PREDICTOR_KEYS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "model"}
KSERVE_MODEL_KEYS = {"modelFormat", "runtime", "protocolVersion", "storageUri"}


def manifests() -> list[tuple[Path, dict]]:
    found = [(path, document) for path in sorted(DEPLOY.rglob("*.yaml"))
             for document in yaml.safe_load_all(path.read_text()) if document]
    assert len(found) >= 7, found
    return found


def by_kind(kind: str) -> dict:
    (document,) = [document for _, document in manifests() if document["kind"] == kind]
    return document


@pytest.mark.parametrize("path, document", manifests(), ids=lambda value: getattr(value, "name", ""))
def test_every_manifest_is_valid_for_kubernetes(path, document):
    if document["kind"] == "InferenceService":
        document = inference_service_as_pod(document)
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def inference_service_as_pod(service: dict) -> dict:
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = dict(service["spec"]["predictor"])
    model = dict(predictor.pop("model"))
    assert set(service["spec"]["predictor"]) - set(predictor) <= KSERVE_PREDICTOR_KEYS
    for key in KSERVE_PREDICTOR_KEYS - {"model"}:
        predictor.pop(key, None)
    assert model["modelFormat"] == {"name": "pytorch"} and model["runtime"] == "kserve-torchserve"
    assert model["protocolVersion"] in ("v1", "v2") and model["storageUri"].startswith("pvc://")
    container = {"name": "kserve-container", **{key: value for key, value in model.items()
                                                 if key not in KSERVE_MODEL_KEYS}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": service["metadata"],
            "spec": {**predictor, "containers": [container]}}


def test_the_plain_kubernetes_manifests_fit_together():
    deployment, service, hpa = by_kind("Deployment"), by_kind("Service"), by_kind("HorizontalPodAutoscaler")
    policy, claim, config = by_kind("NetworkPolicy"), by_kind("PersistentVolumeClaim"), by_kind("ConfigMap")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert volumes["config"]["configMap"]["name"] == config["metadata"]["name"]

    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert [port["containerPort"] for port in container["ports"]] == [8080]
    assert [rule["ports"] for rule in policy["spec"]["ingress"]] == [[{"port": 8080, "protocol": "TCP"}]]
    properties = dict(line.split("=", 1) for line in config["data"]["config.properties"].splitlines() if "=" in line)
    assert properties["inference_address"].endswith(":8080")
    assert all(properties[name].startswith("http://127.0.0.1:") for name in ("management_address", "metrics_address"))
    assert properties["disable_token_authorization"] == "false" and properties["enable_model_api"] == "false"
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert int(properties["number_of_gpu"]) == gpus  # one GPU per worker
    assert '"minWorkers": 2' in properties["models"] and gpus == 2

    probes = [container[name]["exec"]["command"] for name in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert all(command[1] == "/opt/torchserve-diffusers/probe.py" for command in probes)
    assert [command[2] for command in probes] == ["ready", "ready", "live"]


def test_probe_script_is_what_the_image_ships_and_takes_the_manifests_arguments():
    assert "COPY deploy/probe.py /opt/torchserve-diffusers/probe.py" in (DEPLOY / "Dockerfile").read_text()
    done = subprocess.run([sys.executable, str(DEPLOY / "probe.py"), "ready", "--key-file", "/nonexistent/key.json",
                           "--model", "stable_diffusion"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "no key file" in done.stdout


def test_kserve_layout_from_the_model_store(tmp_path):
    store = tmp_path / "model_store"
    store.mkdir()
    (store / "stable_diffusion.mar").write_bytes(b"stand-in archive")
    subprocess.run([sys.executable, str(DEPLOY / "kserve" / "layout.py"), "--model-store", str(store), "--output",
                    str(tmp_path / "storage")], check=True, timeout=60)
    assert (tmp_path / "storage" / "model-store" / "stable_diffusion.mar").read_bytes() == b"stand-in archive"
    text = (tmp_path / "storage" / "config" / "config.properties").read_text()
    properties = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert properties["inference_address"] == "http://127.0.0.1:8085"  # the pod's loopback only
    assert properties["model_store"] == "/mnt/models/model-store" and properties["enable_envvars_config"] == "false"
    assert '"marName": "stable_diffusion.mar"' in properties["model_snapshot"]
    assert "service_envelope" not in text
