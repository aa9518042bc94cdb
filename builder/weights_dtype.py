"""Store a pipeline's weights in the dtype its workers serve, so that they map the files instead of copying them.

safetensors (0.8) hands diffusers tensors that are memory-mapped views of the file; when the dtype on disk is
the served one, ``from_pretrained`` keeps those views, so the weights live in the page cache once, shared by
every worker reading the same extracted archive, and a worker's own memory is its working memory only. When
the dtypes differ (the hub's fp16 files served as float32 or bfloat16 on a CPU), every worker holds its own
converted copy. ``build_mar.sh --weights-dtype bfloat16`` converts at build time, once.
"""

import shutil
from pathlib import Path
from typing import Callable

WEIGHTS_DTYPES = ("float32", "float16", "bfloat16")


def convert_weights(source: Path, target: Path, dtype_name: str, progress: Callable[[str], None]) -> Path:
    """A copy of the pipeline folder ``source`` at ``target`` with every floating-point tensor of its
    safetensors files cast to ``dtype_name``; other files are copied as they are. One file at a time in memory."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    shutil.rmtree(target, ignore_errors=True)
    for path in sorted(source.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(source).parts):
            continue
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix != ".safetensors":
            shutil.copyfile(path, destination)
            continue
        progress(f"  converting {path.relative_to(source)} to {dtype_name}")
        with safe_open(str(path), framework="pt") as weights:
            metadata = weights.metadata()
            tensors = {name: weights.get_tensor(name) for name in weights.keys()}
        converted = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                     for name, tensor in tensors.items()}
        save_file(converted, str(destination), metadata=metadata)
        del tensors, converted
    return target
