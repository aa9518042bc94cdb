"""``build_mar.sh --embedding NAME=FILE.safetensors``: check textual-inversion embeddings against the pipeline and
stage them as ``embeddings/NAME.safetensors``, where the handler reads them (handler/model/embeddings.py).

Checked from the pipeline folder's tokenizers and text encoder configs, without loading any model weights: the
file's format, that it has vectors for each text encoder (an SDXL pair for SDXL) as wide as that encoder's, and
that NAME (and NAME_1 ... for a multi-vector one) is no token the tokenizer already has.
"""

import json
import os
import shutil
from pathlib import Path

from handler.model.embeddings import (PACKAGED_FOLDER, SUFFIX, EmbeddingError, TextEncoderSlot, check_fits,
                                      check_name, read_vectors)


def parse_embedding_argument(text: str) -> tuple[str, Path]:
    """``NAME=FILE`` -> (name, file)."""
    name, separator, path = text.partition("=")
    if not separator or not path:
        raise EmbeddingError(f"--embedding takes NAME=FILE (e.g. --embedding easynegative=/embeddings/"
                             f"EasyNegative.safetensors), got {text!r}")
    check_name(name)
    if not Path(path).is_file():
        raise EmbeddingError(f"--embedding {text}: {path} is not a file")
    return name, Path(path)


def folder_slots(pipeline_folder: Path) -> list[TextEncoderSlot]:
    """The text encoders of a pipeline folder that take embeddings, read from its tokenizers and configs."""
    from transformers import CLIPTokenizer

    index = json.loads((pipeline_folder / "model_index.json").read_text())
    slots = []
    for key, tokenizer, encoder in (("clip_l", "tokenizer", "text_encoder"), ("clip_g", "tokenizer_2", "text_encoder_2")):
        entry = index.get(encoder)
        if not isinstance(entry, list) or entry[1] is None:
            continue
        if not str(entry[1]).startswith("CLIPTextModel"):
            continue
        config = json.loads((pipeline_folder / encoder / "config.json").read_text())
        slots.append(TextEncoderSlot(key, CLIPTokenizer.from_pretrained(pipeline_folder / tokenizer),
                                     config["hidden_size"]))
    if index.get("_class_name") not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline") or not slots:
        raise EmbeddingError(f"textual-inversion embeddings are served for SD 1.x/2.x and SDXL pipelines; "
                             f"{pipeline_folder} holds a {index.get('_class_name')}")
    return slots


def stage_embeddings(arguments: list[str], pipeline_folder: Path, staging: Path, progress) -> list[str]:
    """Check every ``--embedding`` against the pipeline and copy it to ``staging/embeddings/NAME.safetensors``."""
    parsed = [parse_embedding_argument(text) for text in arguments]
    names = [name for name, _ in parsed]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise EmbeddingError(f"--embedding names must differ; given more than once: {repeated}")
    slots = folder_slots(pipeline_folder)
    for name, path in parsed:
        vectors = read_vectors(path)
        check_fits(name, vectors, slots, path)
        destination = staging / PACKAGED_FOLDER / f"{name}{SUFFIX}"
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
        os.chmod(destination, 0o644)
        progress(f"  embedding {name}: {vectors['clip_l'].shape[0]} vector(s) for {len(vectors)} text encoder(s) "
                 f"({path})")
    return names
