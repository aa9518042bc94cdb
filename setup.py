"""torchserve-diffusers: serve Hugging Face diffusers text-to-image pipelines on TorchServe.

Install with the pinned versions: ``pip install -c constraints.txt -e ".[test]"`` (scripts/setup.sh does it).
torch is left as a range here so a GPU user can bring their own CUDA build; constraints.txt pins the CPU one.
"""

from setuptools import find_packages, setup

setup(
    name="torchserve-diffusers",
    version="0.1.0",
    description="A TorchServe handler and build tooling for diffusers text-to-image pipelines",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["handler", "handler.*", "builder", "sdclient", "harness"]),
    install_requires=[
        "torch>=2.5",
        "torchserve>=0.12",
        "torch-model-archiver>=0.12",
        "diffusers>=0.42",
        "transformers>=5.0",
        "accelerate",
        "safetensors",
        "huggingface-hub",
        "numpy",
        "pillow",
        "scipy",
        "PyYAML",
        "psutil",
        "requests",
        "tqdm",
        "peft",
        "opencv-python-headless",
        "compel",
        "sentencepiece",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "hypothesis-jsonschema", "jsonschema", "openai", "tritonclient[http]",
                 "webuiapi", "kubernetes-validate", "torchao"],
        "quantization": ["torchao"],  # the quantization preset
        "openvino": ["openvino"],  # compile_backend: openvino, for Intel CPUs
    },
)
