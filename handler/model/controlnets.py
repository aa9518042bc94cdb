"""Find and load the ControlNets packed into a model archive (``build_mar.sh --controlnet NAME=FOLDER``).

Each one is a diffusers ControlNet folder at ``controlnets/NAME/`` in the model directory, checked against the
base pipeline when the archive was built. All of them are loaded at start-up and stay resident beside the
base weights: a request only chooses among them.
"""

import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

CONTROLNET_FOLDER = "controlnets"
MODEL_CLASSES = ("ControlNetModel", "FluxControlNetModel")


def controlnet_folders(model_dir: Path) -> dict[str, Path]:
    """The packed ControlNet folders by name (none if the archive has no controlnets/ folder)."""
    root = Path(model_dir) / CONTROLNET_FOLDER
    if not root.is_dir():
        return {}
    return {folder.name: folder for folder in sorted(root.iterdir())
            if folder.is_dir() and not folder.is_symlink() and (folder / "config.json").is_file()}


def load_controlnets(folders: dict[str, Path], placement) -> dict:
    """Load each ControlNet offline in the placement's dtype, on its device. With cpu_offload it stays on the
    GPU too: the offload hooks are set on the base pipeline's components only."""
    import diffusers

    models = {}
    for number, (name, folder) in enumerate(folders.items(), start=1):
        started = time.perf_counter()
        class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
        if class_name not in MODEL_CLASSES:
            raise ValueError(f"ControlNet {name} in {folder} is a {class_name}; expected one of {MODEL_CLASSES}")
        model = getattr(diffusers, class_name).from_pretrained(folder, local_files_only=True,
                                                               torch_dtype=placement.dtype)
        models[name] = model.to(placement.device).eval()
        logger.info("loaded ControlNet %d/%d %s (%s) in %.2f s", number, len(folders), name, class_name,
                    time.perf_counter() - started)
    return models
