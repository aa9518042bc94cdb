"""Read a saved pipeline's ``model_index.json``.

``save_pretrained`` records a component that was ``None`` as ``[null, null]``. ``DiffusionPipeline.from_pretrained``
loads optional components saved that way, but a required one (an SD3 saved without T5: ``text_encoder_3`` and
``tokenizer_3``) fails to load unless it is passed as ``None`` explicitly.
"""

import json
from pathlib import Path


def null_components(folder: Path) -> dict:
    """``{name: None}`` for every component saved as ``[null, null]``, to pass on to ``from_pretrained``."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {name: None for name, value in index.items() if value == [None, None]}
