"""Textual-inversion embeddings: new prompt words, each standing for one or more learned token vectors.

The files come from ``embeddings/NAME.safetensors`` in the model folder (packed by ``build_mar.sh --embedding
NAME=FILE``) and the operator's ``embedding_dir`` setting, read at start-up; a prompt or negative prompt uses one
by its name, as AUTOMATIC1111 users write it (``a castle, by NAME``; negative ``NAME``). Formats read:

- AUTOMATIC1111's: ``emb_params`` (its .safetensors form) or ``string_to_param.*``, vectors ``[n, width]``;
- diffusers' (``save_textual_inversion``): one tensor under the token it was trained as;
- SDXL's pair: ``clip_l`` for the first text encoder and ``clip_g`` for the second.

Each is added to the tokenizer(s) as the word NAME (and NAME_1 ... NAME_{n-1} for an n-vector one; diffusers
expands NAME in a prompt into all of them) with its vectors in the text encoder's token embedding. A name that
is already a token of the tokenizer (``castle``, or ``castle</w>``: a whole word) would silently change what that
word means, so it is refused.
"""

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from handler.model.weight_files import WeightFileError, check_safetensors

logger = logging.getLogger(__name__)

PACKAGED_FOLDER = "embeddings"  # inside the model folder: what build_mar.sh --embedding packs
SUFFIX = ".safetensors"
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")  # a word in a prompt: no brackets, colons or spaces
A1111_KEYS = ("emb_params", "string_to_param.*")
SDXL_KEYS = ("clip_l", "clip_g")


class EmbeddingError(ValueError):
    """An embedding file or name that cannot be used with this pipeline; the message says which and why."""


@dataclass(frozen=True)
class TextEncoderSlot:
    """One tokenizer and the width of its text encoder's token vectors; ``key`` names its part of an SDXL pair."""

    key: str
    tokenizer: object
    width: int


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise EmbeddingError(f"embedding name {name!r} must be a letter then letters, digits, '_' and '-', at most "
                             "64 characters (it is a word of the prompt)")


def read_vectors(path: Path) -> dict[str, "torch.Tensor"]:
    """The file's vectors per encoder key (``clip_l``/``clip_g`` for SDXL, else ``clip_l``), each ``[n, width]``."""
    from safetensors import safe_open

    try:
        header = check_safetensors(path, "embedding")
    except WeightFileError as error:
        raise EmbeddingError(str(error)) from None
    keys = sorted(header)
    if set(SDXL_KEYS) <= set(keys):
        chosen = {"clip_l": "clip_l", "clip_g": "clip_g"}
    elif any(key in keys for key in A1111_KEYS):
        chosen = {"clip_l": next(key for key in A1111_KEYS if key in keys)}
    elif len(keys) == 1:
        chosen = {"clip_l": keys[0]}  # diffusers: the token it was trained as -> its vectors
    else:
        raise EmbeddingError(f"embedding {path}: tensors {keys[:6]} are no embedding format read here (one tensor; "
                             f"AUTOMATIC1111's emb_params or string_to_param.*; SDXL's clip_l and clip_g)")
    with safe_open(str(path), framework="pt") as weights:
        vectors = {slot: weights.get_tensor(key) for slot, key in chosen.items()}
    for slot, tensor in vectors.items():
        if tensor.dim() == 1:
            vectors[slot] = tensor = tensor[None]
        if tensor.dim() != 2 or tensor.shape[0] == 0 or not tensor.isfinite().all():
            raise EmbeddingError(f"embedding {path}: {chosen[slot]} has shape {list(tensor.shape)}; expected finite "
                                 "vectors [count, width]")
    return vectors


def tokens_of(name: str, count: int) -> list[str]:
    """The tokenizer words of an embedding of ``count`` vectors, as diffusers adds them."""
    return [name] + [f"{name}_{index}" for index in range(1, count)]


def check_fits(name: str, vectors: dict, slots: list[TextEncoderSlot], path: Path) -> None:
    """Refuse an embedding whose encoders, widths or words do not fit the pipeline's text encoders."""
    expected = [slot.key for slot in slots]
    if sorted(vectors) != sorted(expected):
        have = "an SDXL pair (clip_l, clip_g)" if len(vectors) == 2 else "vectors for one text encoder"
        want = "an SDXL pair (clip_l and clip_g)" if len(expected) == 2 else "vectors for one text encoder"
        raise EmbeddingError(f"embedding {name} ({path}) holds {have}; this pipeline needs {want}")
    for slot in slots:
        width = vectors[slot.key].shape[1]
        if width != slot.width:
            raise EmbeddingError(f"embedding {name} ({path}): its {slot.key} vectors are {width} wide but the text "
                                 f"encoder's are {slot.width} (an embedding for another model family?)")
        vocabulary = slot.tokenizer.get_vocab()
        for token in tokens_of(name, vectors[slot.key].shape[0]):
            for form in (token, f"{token}</w>"):
                if form in vocabulary:
                    raise EmbeddingError(f"embedding name {name!r} clashes with the token {form!r} the tokenizer "
                                         "already has: a prompt could not tell them apart; choose another name")


def slots_of(pipeline) -> list[TextEncoderSlot]:
    """The text encoders of a loaded pipeline that take embeddings (SD 1.x/2.x: one; SDXL: two)."""
    slots = [TextEncoderSlot("clip_l", pipeline.tokenizer, pipeline.text_encoder.get_input_embeddings().weight.shape[1])]
    if getattr(pipeline, "text_encoder_2", None) is not None:
        slots.append(TextEncoderSlot("clip_g", pipeline.tokenizer_2,
                                     pipeline.text_encoder_2.get_input_embeddings().weight.shape[1]))
    return slots


def find_embeddings(model_dir: Path, embedding_dir: str = "") -> dict[str, Path]:
    """Every embedding this model may use, by name (the file name without .safetensors); packed ones first."""
    if embedding_dir and not Path(embedding_dir).is_dir():
        raise EmbeddingError(f"embedding_dir {embedding_dir} is not a folder")
    found: dict[str, Path] = {}
    for folder in [Path(model_dir) / PACKAGED_FOLDER] + ([Path(embedding_dir)] if embedding_dir else []):
        for path in sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else ():
            name = path.name[:-len(SUFFIX)]
            if not NAME.fullmatch(name):
                logger.warning("skipping embedding file %s: a name is a letter then letters, digits, '_' and '-'", path)
            elif name in found:
                raise EmbeddingError(f"two embedding files are named {name}: {found[name]} and {path}; rename one")
            else:
                found[name] = path
    return found


def load_embeddings(pipeline, files: dict[str, Path]) -> tuple[str, ...]:
    """Add every embedding that fits to the pipeline's tokenizers and text encoders; the names served.

    One that does not fit (only possible from ``embedding_dir``: packed ones were checked at build time) is logged
    and skipped, so the operator's folder cannot stop the model from loading.
    """
    if not files:
        return ()
    if not hasattr(pipeline, "load_textual_inversion"):
        logger.error("%s takes no textual-inversion embeddings; not serving %s", type(pipeline).__name__, sorted(files))
        return ()
    served = []
    for name, path in sorted(files.items()):
        try:
            vectors = read_vectors(path)
            slots = slots_of(pipeline)
            check_fits(name, vectors, slots, path)
        except EmbeddingError as error:
            logger.error("not serving embedding %s: %s", name, error)
            continue
        encoders = {"clip_l": pipeline.text_encoder, "clip_g": getattr(pipeline, "text_encoder_2", None)}
        for slot in slots:
            pipeline.load_textual_inversion(vectors[slot.key], token=name, tokenizer=slot.tokenizer,
                                            text_encoder=encoders[slot.key])
        served.append(name)
        logger.info("serving embedding %s (%d vector(s)) from %s", name, vectors["clip_l"].shape[0], path)
    return tuple(served)
