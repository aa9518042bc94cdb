"""Read a saved pipeline's ``model_index.json``.

``save_pretrained`` records a component that was ``None`` as ``[null, null]``.
``DiffusionPipeline.from_pretrained`` loads optional components saved that way, but refuses a required one (an SD3
saved without T5: ``text_encoder_3`` and ``tokenizer_3``) unless it is passed as ``None`` explicitly.
"""

import json
from pathlib import Path


def read_model_index(folder: Path) -> dict:
    return json.loads((Path(folder) / "model_index.json").read_text())


def pipeline_class_name(folder: Path) -> str:
    """The diffusers pipeline class a folder holds (decides per-family defaults before loading)."""
    return read_model_index(folder).get("_class_name", "DiffusionPipeline")


def null_components(folder: Path) -> dict:
    """``{name: None}`` for every component saved as ``[null, null]``, to pass on to ``from_pretrained``."""
    index = read_model_index(folder)
    return {name: None for name, value in index.items() if value == [None, None]}
