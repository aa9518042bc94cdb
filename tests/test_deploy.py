"""Every manifest in deploy/ against its schema, offline, and how the manifests fit the image and each other.

Kubernetes' own kinds are validated with kubernetes-validate. An InferenceService is KServe's custom resource:
it is validated against the schema of KServe's CRD (tests/schemas/, vendored from kserve/kserve with its source
in its ``$comment``), strictly, as ``kubectl apply --validate=strict`` would: an unknown field is an error.
The KServe layout script runs on a model store with a stand-in archive (it only copies the file and names it
in the config).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from helpers import MODEL, REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
KUBERNETES_VERSION = "1.37"
KSERVE_SCHEMA = REPO_ROOT / "tests" / "schemas" / "kserve-inferenceservice-v1beta1.json"


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
        jsonschema.validate(document, strict(json.loads(KSERVE_SCHEMA.read_text())))
    else:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def strict(schema):
    """The CRD schema with unknown fields refused: the API server prunes them silently, which hides a typo."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        closed["additionalProperties"] = False
    return closed


def test_the_schema_check_refuses_an_unknown_field():
    service = kserve_services()["inferenceservice.yaml"]
    service["spec"]["predictor"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolicyy"):
        jsonschema.validate(service, strict(json.loads(KSERVE_SCHEMA.read_text())))


def kserve_services() -> dict[str, dict]:
    return {path.name: document for path, document in manifests() if document["kind"] == "InferenceService"}


def test_the_inference_service_runs_the_serving_image_as_a_custom_container():
    service = kserve_services()["inferenceservice.yaml"]
    predictor = service["spec"]["predictor"]
    assert "model" not in predictor, "no KServe serving runtime: the image itself is the predictor"
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # the name KServe's storage initializer mounts /mnt/models for
    env = {variable["name"]: variable["value"] for variable in container["env"]}
    assert re.match(r"(pvc|s3|gs|https?)://", env["STORAGE_URI"])
    assert env["MODELS"] == f"{MODEL}={MODEL}.mar"
    assert [port["containerPort"] for port in container["ports"]] == [image_port()]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ping", "port": image_port()}
    assert container["args"] == ["--disable-token-auth"]  # KServe's clients hold no TorchServe key
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert predictor["minReplicas"] == 0 and predictor["maxReplicas"] >= 1  # scale to zero
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    assert predictor["timeout"] > nginx_drain_seconds()  # Knative's grace period on scale-down


def test_the_old_runtime_manifest_is_marked_deprecated_upstream():
    path = DEPLOY / "kserve" / "deprecated-torchserve-runtime.yaml"
    assert "DEPRECATED UPSTREAM" in path.read_text() and "kserve/kserve#4568" in path.read_text()
    model = kserve_services()[path.name]["spec"]["predictor"]["model"]
    assert model["runtime"] == "kserve-torchserve" and model["storageUri"].startswith("pvc://")


def image_port() -> int:
    (port,) = re.findall(r"^EXPOSE (\d+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    assert re.search(rf"^\s*listen {port};", (DEPLOY / "nginx.conf").read_text(), re.MULTILINE)
    return int(port)


def image_files() -> set[str]:
    """Where the Dockerfile's COPY lines put files, as absolute paths in the image."""
    copied = set()
    for line in re.findall(r"^COPY (.+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE):
        *sources, destination = line.split()
        copied.update(destination + Path(source).name if destination.endswith("/") else destination
                      for source in sources)
    return copied


def nginx_drain_seconds() -> int:
    (seconds,) = re.findall(r"^worker_shutdown_timeout (\d+)s;", (DEPLOY / "nginx.conf").read_text(), re.MULTILINE)
    return int(seconds)


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
    assert [port["containerPort"] for port in container["ports"]] == [image_port()]
    assert [rule["ports"] for rule in policy["spec"]["ingress"]] == [[{"port": image_port(), "protocol": "TCP"}]]
    assert "args" not in container and "command" not in container  # the image's entrypoint: nginx, the drain
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > nginx_drain_seconds()
    env = {variable["name"]: variable["value"] for variable in container["env"]}
    assert env["TS_CONFIG"] == "/config/config.properties" and env["MODELS"] == f"{MODEL}={MODEL}.mar"
    properties = dict(line.split("=", 1) for line in config["data"]["config.properties"].splitlines() if "=" in line)
    image_properties = dict(line.split("=", 1) for line in (DEPLOY / "config.properties").read_text().splitlines()
                            if "=" in line and not line.startswith("#"))
    assert properties["inference_address"] == image_properties["inference_address"]  # where nginx forwards
    assert all(properties[name].startswith("http://127.0.0.1:") for name in ("management_address", "metrics_address"))
    assert properties["disable_token_authorization"] == "false" and properties["enable_model_api"] == "false"
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert int(properties["number_of_gpu"]) == gpus  # one GPU per worker
    assert '"minWorkers": 2' in properties["models"] and gpus == 2

    probes = [container[name]["exec"]["command"] for name in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert all(command[1] == "/opt/torchserve-diffusers/probe.py" for command in probes)
    assert [command[2] for command in probes] == ["ready", "ready", "live"]


def test_probe_script_is_what_the_image_ships_and_takes_the_manifests_arguments():
    assert "/opt/torchserve-diffusers/probe.py" in image_files()
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
