"""LoRA adapters: which files a model may use, checking that one fits the pipeline, and switching per call.

The files come from two places only: ``loras/NAME.safetensors`` inside the model folder (packed by
``build_mar.sh --lora NAME=PATH``) and the operator's ``lora_dir`` setting, read at start-up. A request names
adapters, never paths, so nothing a client sends reaches the file system.

Adapters stay loaded into the pipeline's modules (PEFT layers) up to ``max_loaded_loras``; the least recently
used one is deleted to make room. Before every pipeline call ``activate`` selects the call's adapters with
their scales, or disables LoRA for a call without any, so a request gets the same image whatever ran before.

With ``hotswap`` (used with ``torch_compile``), the model holds fixed adapter slots prepared by
``enable_lora_hotswap`` before compiling, and a switch copies another adapter's weights into a slot
(``load_lora_weights(..., hotswap=True)``) instead of adding layers, which would recompile. The LRU then keeps
adapters' weights in memory rather than in the model.
"""

import hashlib
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

PACKAGED_FOLDER = "loras"  # inside the model folder: what build_mar.sh --lora packs
LORA_SUFFIX = ".safetensors"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
A1111_SHORT_HASH = 12  # hex digits of a LoRA's hash that A1111's infotext shows
MAX_REASON = 600  # characters of a loader error shown in a refusal
# diffusers reports adapter weights that match no module as a warning, not an error: those make a refusal too.
UNMATCHED_WARNINGS = ("unexpected keys", "missing keys")
Selection = tuple[tuple[str, float], ...]  # (name, scale) per adapter, sorted by name: a request's LoRA set


class LoraError(ValueError):
    """A LoRA file that cannot be used with this pipeline; the message names the file and why."""


def find_loras(model_dir: Path, lora_dir: str = "") -> dict[str, Path]:
    """Every LoRA this model may serve, by name (the file name without ``.safetensors``).

    Packaged files come first; a ``lora_dir`` file with the name of a packaged one is refused (ambiguous).
    """
    if lora_dir and not Path(lora_dir).is_dir():
        raise LoraError(f"lora_dir {lora_dir} is not a folder")
    found: dict[str, Path] = {}
    folders = [Path(model_dir) / PACKAGED_FOLDER] + ([Path(lora_dir)] if lora_dir else [])
    for folder in folders:
        for path in sorted(folder.glob(f"*{LORA_SUFFIX}")) if folder.is_dir() else ():
            name = path.name[:-len(LORA_SUFFIX)]
            if not NAME.fullmatch(name):
                logger.warning("skipping LoRA file %s: a name is letters, digits, '_', '-' and '.' (64 at most)",
                               path)
                continue
            if name in found:
                raise LoraError(f"two LoRA files are named {name}: {found[name]} and {path}; rename one")
            found[name] = path
    return found


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise LoraError(f"LoRA name {name!r} must be letters, digits, '_', '-' and '.', starting with a letter or "
                        "digit, at most 64 characters")


def check_lora(pipeline, path: Path) -> None:
    """Raise LoraError unless ``path`` loads into ``pipeline``; leaves the pipeline as it was.

    Refused: a file the loader cannot read or convert, weights whose shapes differ from the modules they name
    (a LoRA for another family or size), and a file none or only part of whose weights match the pipeline's
    modules (diffusers only warns about those and loads nothing, or a part). The probe's adapter name is one no
    module path contains: diffusers picks the missing keys it reports by a substring match on that name.
    """
    probe = "build-check"
    warnings = _CollectedWarnings()
    peft_logger = logging.getLogger("diffusers.utils.peft_utils")
    peft_logger.addHandler(warnings)
    try:
        pipeline.load_lora_weights(str(path), adapter_name=probe)
    except Exception as error:  # the loaders raise ValueError, RuntimeError, KeyError, safetensors errors
        _forget(pipeline, probe)
        raise LoraError(f"LoRA file {path} does not fit {type(pipeline).__name__}: "
                        f"{_short(f'{type(error).__name__}: {error}')}") from None
    finally:
        peft_logger.removeHandler(warnings)
    loaded = any(probe in names for names in pipeline.get_list_adapters().values())
    unmatched = [message for message in warnings.messages if any(word in message for word in UNMATCHED_WARNINGS)]
    _forget(pipeline, probe)
    if not loaded or unmatched:
        why = _short(unmatched[0]) if unmatched else "none of its weights name a module of this pipeline"
        raise LoraError(f"LoRA file {path} does not fit {type(pipeline).__name__} (a LoRA for another model "
                        f"family?): {why}")


def _forget(pipeline, adapter_name: str) -> None:
    if any(adapter_name in names for names in pipeline.get_list_adapters().values()):
        pipeline.delete_adapters(adapter_name)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[:MAX_REASON] + "..."


class _CollectedWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass(frozen=True)
class HotswapPlan:
    """How many slots the compiled model keeps, and the largest LoRA rank a slot takes."""

    slots: int
    max_rank: int


class LoraAdapters:
    """The adapters one pipeline serves: the available files, the resident ones (LRU), the active set."""

    def __init__(self, pipeline, files: dict[str, Path], max_loaded: int, hotswap: Optional[HotswapPlan] = None):
        self.pipeline = pipeline
        self.files = dict(files)
        self.max_loaded = max_loaded
        self.hotswap = hotswap
        self._resident: "OrderedDict[str, object]" = OrderedDict()  # name -> None (in the model) or state dict
        self._active: Optional[Selection] = None
        self._slot_of: dict[str, str] = {}  # hotswap: adapter name -> slot holding it
        self._natural_scaling: dict[str, dict[int, float]] = {}  # hotswap: slot -> layer id -> alpha / rank
        self.switches = 0
        self._hashes: dict[str, str] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.files))

    def short_hash(self, name: str) -> str:
        """AUTOMATIC1111's short hash of a LoRA file (its ``Lora hashes`` infotext entry), computed once."""
        if name not in self._hashes:
            self._hashes[name] = addnet_hash(self.files[name])[:A1111_SHORT_HASH]
        return self._hashes[name]

    def check_all(self) -> list[str]:
        """Check every file against the pipeline at start-up; drop (and log) those that do not fit.

        Returns the messages of the dropped ones. Packaged files were checked at build time already, so this
        matters for ``lora_dir``, which an operator fills.
        """
        dropped = []
        for name in self.names:
            try:
                check_lora(self.pipeline, self.files[name])
            except LoraError as error:
                logger.error("not serving LoRA %s: %s", name, error)
                dropped.append(str(error))
                del self.files[name]
        return dropped

    def prepare_hotswap(self) -> None:
        """Before compiling: fill each slot, padded to the largest rank, with its scaling held in a tensor.

        A compiled graph guards on Python floats, so the slots' scales are tensors written in place
        (``_set_slot_scales``); ``set_adapters`` would put floats back and recompile. diffusers prepares only
        the adapters present when it is asked, hence a request before each slot's load.
        """
        from safetensors.torch import load_file

        widest = max(self.names, key=lambda name: _module_count(self.files[name]))  # the slots' target layers
        for number, slot in enumerate(self._slots()):
            # diffusers refuses a second request once adapters exist ("error"): the model is not compiled yet.
            self.pipeline.enable_lora_hotswap(target_rank=self.hotswap.max_rank,
                                              check_compiled="error" if number == 0 else "ignore")
            self.pipeline.load_lora_weights(load_file(self.files[widest]), adapter_name=slot)
        self.pipeline.set_adapters(self._slots(), [1.0] * self.hotswap.slots)  # all active: each layer's scaling
        self._slot_of = {}                                                     # is now its own alpha / rank
        self._natural_scaling = {slot: {} for slot in self._slots()}
        for slot in self._slots():
            self._remember_scaling(slot)
        self._set_slot_scales({})

    def activate(self, selection: Selection) -> None:
        """Make ``selection`` the adapters (and scales) of the next pipeline call."""
        if selection == self._active:
            return
        started = time.perf_counter()
        if self.hotswap is not None:
            self._activate_hotswapped(selection)
        elif not selection:
            self.pipeline.disable_lora()
        else:
            for name, _ in selection:
                self._make_resident(name)
            self.pipeline.enable_lora()
            self.pipeline.set_adapters([name for name, _ in selection], [scale for _, scale in selection])
        self._active = selection
        self.switches += 1
        logger.info("LoRA set %s active in %.1f ms", [name for name, _ in selection] or "none",
                    (time.perf_counter() - started) * 1000)

    def _make_resident(self, name: str) -> None:
        if name in self._resident:
            self._resident.move_to_end(name)
            return
        while len(self._resident) >= self.max_loaded:
            evicted, _ = self._resident.popitem(last=False)
            self.pipeline.delete_adapters(evicted)
            logger.info("unloaded LoRA %s (max_loaded_loras %d)", evicted, self.max_loaded)
        self.pipeline.load_lora_weights(str(self.files[name]), adapter_name=name)  # checked at build or start-up
        self._resident[name] = None
        logger.info("loaded LoRA %s from %s", name, self.files[name])

    def _activate_hotswapped(self, selection: Selection) -> None:
        """Copy the selection's weights into the slots (in place), then set each slot's scale (0: unused)."""
        wanted = [name for name, _ in selection]
        keep = {name: slot for name, slot in self._slot_of.items() if name in wanted}
        free = [slot for slot in self._slots() if slot not in keep.values()]
        for name in wanted:
            if name not in keep:
                slot = free.pop(0)
                self.pipeline.load_lora_weights(self._weights(name), adapter_name=slot, hotswap=True)
                self._remember_scaling(slot)
                keep[name] = slot
        self._slot_of = keep
        scales = dict(selection)
        self._set_slot_scales({slot: scales[name] for name, slot in keep.items()})

    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [module for module in self.pipeline.components.values() if hasattr(module, "modules")
                for module in module.modules() if isinstance(module, LoraLayer)]

    def _remember_scaling(self, slot: str) -> None:
        """The loaded LoRA's own scaling (alpha / rank) per layer: a request's scale multiplies it."""
        import torch

        for layer in self._lora_layers():
            if slot in layer.scaling:
                value = layer.scaling[slot]
                if not isinstance(value, torch.Tensor):
                    layer.scaling[slot] = value = torch.tensor(float(value), device=layer.weight.device)
                self._natural_scaling[slot][id(layer)] = float(value)

    def _set_slot_scales(self, slot_scales: dict[str, float]) -> None:
        for layer in self._lora_layers():
            for slot in self._slots():
                if slot in layer.scaling:
                    natural = self._natural_scaling[slot][id(layer)]
                    layer.scaling[slot].fill_(natural * slot_scales.get(slot, 0.0))

    def _weights(self, name: str) -> dict:
        """An adapter's state dict, kept in memory for the ``max_loaded`` most recently used ones."""
        from safetensors.torch import load_file

        if name in self._resident:
            self._resident.move_to_end(name)
            return dict(self._resident[name])
        while len(self._resident) >= self.max_loaded:
            self._resident.popitem(last=False)
        weights = load_file(self.files[name])
        self._resident[name] = weights
        return dict(weights)

    def _slots(self) -> list[str]:
        return [f"hotswap-slot-{slot}" for slot in range(self.hotswap.slots)]


def _module_count(path: Path) -> int:
    """How many layers a LoRA file adapts (its down/A matrices), read from the header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as weights:
        return sum(key.endswith(("lora_A.weight", "lora_down.weight", "lora.down.weight")) for key in weights.keys())


def rank_of(path: Path) -> int:
    """The largest LoRA rank in a file (rows of its down/A matrices), read from the header without loading."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as weights:
        ranks = [weights.get_slice(key).get_shape()[0] for key in weights.keys()
                 if key.endswith(("lora_A.weight", "lora_down.weight", "lora.down.weight"))]
    return max(ranks, default=1)


def addnet_hash(path: Path) -> str:
    """SHA-256 of a safetensors file's tensor data (everything after its JSON header), as AUTOMATIC1111 and
    civitai hash LoRAs: editing the header's metadata keeps the hash."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
        file.seek(8 + header_length)
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def serve_loras(pipeline, files: dict[str, Path], max_loras: int, max_loaded: int,
                hotswap: bool) -> Optional[LoraAdapters]:
    """The LoraAdapters of a freshly loaded pipeline (before placing and compiling it), or None without files.

    ``hotswap`` (with torch_compile): ``max_loras`` slots of the largest rank among the files.
    """
    if not files:
        return None
    plan = HotswapPlan(max_loras, max(rank_of(path) for path in files.values())) if hotswap else None
    adapters = LoraAdapters(pipeline, files, max_loaded, plan)
    adapters.check_all()
    if plan is not None and adapters.files:
        adapters.prepare_hotswap()
    return adapters
