"""docs/models.md's build commands, run as written on tiny stand-ins for the files they name: a civitai
checkpoint (the tiny SD 1 pipeline in the original layout), its layout folder, and AUTOMATIC1111 embeddings."""

import json
import os
import re
import shlex
import subprocess
import sys
import zipfile

import torch
from safetensors.torch import save_file

from conftest import REPO_ROOT

PAGE = (REPO_ROOT / "docs" / "models.md").read_text()


def documented(prefix: str) -> list[str]:
    """Every command of the page's bash blocks that starts with ``prefix``, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", PAGE, re.DOTALL)
    commands = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [command for command in commands if command.startswith(prefix)]


def test_the_documented_builds_run_on_tiny_files(tmp_path):
    from builder.original_layout import write_original_checkpoint
    from builder.tiny_pipeline import build_tiny_pipeline

    pipeline = build_tiny_pipeline(tmp_path / "layouts" / "sd15", "sd1")  # stands for the downloaded layout
    write_original_checkpoint(pipeline, "sd1", tmp_path / "models" / "dreamshaper_8.safetensors")
    (tmp_path / "embeddings").mkdir()
    for seed, name in enumerate(("easynegative", "castlestyle")):
        save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(seed))},
                  tmp_path / "embeddings" / f"{name}.safetensors")
    from builder.tiny_ip_adapter import WEIGHTS, build_tiny_ip_adapter

    adapter = build_tiny_ip_adapter(tmp_path / "layouts" / "sd15", tmp_path / "IP-Adapter" / "models")
    (adapter / WEIGHTS).rename(adapter / "ip-adapter_sd15.safetensors")  # the name h94/IP-Adapter gives it
    builds = documented("./build_mar.sh")
    assert len(builds) == 3
    packed = []
    for command in builds:
        arguments = shlex.split(command)[1:] + ["--export-path", str(tmp_path / "model_store"),
                                                "--work-dir", str(tmp_path / "build")]
        result = subprocess.run([str(REPO_ROOT / "build_mar.sh"), *arguments], cwd=tmp_path, capture_output=True,
                                text=True, env={**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0, command + "\n" + result.stderr[-3000:]
        with zipfile.ZipFile(tmp_path / "model_store" / "dreamshaper.mar") as archive:
            packed.append(archive.namelist())
    assert all(any(name.endswith("unet/diffusion_pytorch_model.safetensors") for name in names) for names in packed)
    assert {"embeddings/easynegative.safetensors", "embeddings/castlestyle.safetensors"} <= set(packed[1])
    assert "ip_adapters/style/image_encoder/model.safetensors" in packed[2]


def test_the_documented_ip_adapter_request_is_a_valid_body(tmp_path):
    from handler.core.contract import FIELD_NAMES
    from handler.protocols import native

    from PIL import Image

    Image.new("RGB", (64, 64), "orange").save(tmp_path / "painting.png")
    for command in documented("python3 -c"):
        subprocess.run(command, shell=True, cwd=tmp_path, check=True)
    body = json.loads((tmp_path / "request.json").read_text())
    assert set(body) <= set(FIELD_NAMES) | {spec.name for spec in native.FIELDS} and body["ip_adapter"] == "style"
    assert documented("curl")[-1].count("-d @request.json") == 1


def test_the_documented_requests_carry_the_inference_key():
    # Token authorization is on in the shipped config.properties: a request without the key gets a 401.
    requests = documented("curl")
    assert len(requests) == 3 and all('-H "Authorization: Bearer $TOKEN"' in command for command in requests)
    assert "TOKEN=$(" in PAGE


def test_the_documented_requests_name_the_packed_embeddings():
    packed = set(re.findall(r"--embedding (\w+)=", " ".join(documented("./build_mar.sh"))))
    bodies = [json.loads(shlex.split(command)[shlex.split(command).index("-d") + 1])
              for command in documented("curl") if "-d @" not in command]
    assert bodies and all(body["prompt"] for body in bodies)
    used = {word for body in bodies for text in (body["prompt"], body.get("negative_prompt", ""))
            for word in re.findall(r"\w+", text) if word in packed}
    assert used == packed
