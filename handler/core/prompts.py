"""Prompt syntax and long prompts: weighted text -> the embeddings a pipeline call takes instead of its text.

The setting ``prompt_syntax`` picks how a prompt is read:

- ``plain``: the pipeline reads the text itself, as diffusers does (CLIP truncates after 77 tokens);
- ``a1111``: AUTOMATIC1111's syntax, ``(word:1.3)``, ``(word)`` = x1.1, ``[word]`` = /1.1, ``\\(`` for a literal
  bracket, ``BREAK`` to start a new chunk. Read leniently as AUTOMATIC1111 does: an unclosed bracket weights the
  rest of the prompt, a stray closing bracket is text, so no prompt is refused for its syntax. Only a weight
  beyond ``MAX_WEIGHT`` either way is refused (AUTOMATIC1111 does not bound them, and 990 nested brackets or a
  45-digit weight overflow the embeddings into a NaN image);
- ``compel``: the ``compel`` library's syntax (``word++``, ``(word)1.3``, ``.blend()``, ``.and()``) and its
  embeddings, with long prompts not truncated.

With ``a1111`` and ``compel`` a prompt longer than the tokenizer's window (77 tokens: BOS, 75 tokens, EOS) is
encoded in chunks of 75 tokens, each with its own BOS and EOS and run through the text encoder separately, and
the chunks' hidden states are concatenated: the UNet's cross-attention reads any number of tokens. That works for
the UNet families conditioned on CLIP hidden states only: SD 1.x/2.x (one encoder) and SDXL (both encoders per
chunk, features concatenated; the pooled embedding from the first chunk, as AUTOMATIC1111 does). SD3 and Flux
condition on T5 (which reads long prompts itself, up to ``max_sequence_length``) and a pooled CLIP vector that has
no chunked form: ``prompt_syntax`` must stay ``plain`` there (the model load says so).

A prompt and its negative prompt are padded to the same number of chunks (with empty chunks), as classifier-free
guidance needs. Requests whose prompts need different numbers of chunks never share a pipeline call (see
``PromptEncoder.length_key``): padding one request to another's length would change its image, and a request's
image must not depend on its neighbours. AUTOMATIC1111's mean restoration after weighting runs per image and
chunk (AUTOMATIC1111 takes the mean over the whole batch, which makes images batch-dependent).
"""

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from handler.core.failures import Rejection, invalid, shown
from handler.core.settings import PROMPT_SYNTAXES, SettingsError

PLAIN, A1111, COMPEL = PROMPT_SYNTAXES
ROUND_STEP = 1.1  # (word) multiplies by 1.1, [word] divides by it
MAX_WEIGHT = 10.0  # the largest effective weight either way: 24 nested brackets; users rarely go past 2
COMMA_BACKTRACK = 20  # a chunk that fills up moves its last words after a comma this close to the end to the next
BREAK = "BREAK"


# --- AUTOMATIC1111's syntax -------------------------------------------------------------------------------------

_A1111_TOKEN = re.compile(r"""
    \\[()\[\]\\]             # an escaped bracket or backslash: the character itself
  | \\                       # a lone backslash: text
  | \(                       # opens a weighted group
  | \[                       # opens a down-weighted group
  | :\s*([+-]?[.\d]+)\s*\)   # closes a group with an explicit weight
  | \)
  | \]
  | [^\\()\[\]:]+            # plain text
  | :                        # a colon that is not a weight: text
""", re.VERBOSE)
_BREAK = re.compile(rf"\s*\b{BREAK}\b\s*")


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text with one weight; ``is_break`` marks a BREAK (a forced chunk boundary)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


def parse_a1111(prompt: str) -> list[Fragment]:
    """AUTOMATIC1111's prompt syntax -> fragments with weights; equal neighbours are merged.

    ``a (cat:1.3) [dog] \\(x\\)`` -> ``a `` 1.0, ``cat`` 1.3, `` `` 1.0, ``dog`` 1/1.1, `` (x)`` 1.0.
    """
    pieces: list[list] = []  # [text, weight] or None for a BREAK
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece is not None:
                piece[1] *= factor

    for match in _A1111_TOKEN.finditer(prompt):
        text, weight = match.group(0), match.group(1)
        explicit = _number(weight) if weight is not None else None
        if text.startswith("\\") and len(text) == 2:
            pieces.append([text[1], 1.0])
        elif text == "(":
            round_open.append(len(pieces))
        elif text == "[":
            square_open.append(len(pieces))
        elif explicit is not None and round_open:
            multiply(round_open.pop(), explicit)
        elif text == ")" and round_open:
            multiply(round_open.pop(), ROUND_STEP)
        elif text == "]" and square_open:
            multiply(square_open.pop(), 1 / ROUND_STEP)
        else:
            for index, part in enumerate(_BREAK.split(text)):
                if index:
                    pieces.append(None)
                pieces.append([part, 1.0])
    for start in round_open:  # unclosed: weights the rest of the prompt, as AUTOMATIC1111 reads it
        multiply(start, ROUND_STEP)
    for start in square_open:
        multiply(start, 1 / ROUND_STEP)

    fragments: list[Fragment] = []
    for piece in pieces:
        if piece is None:
            fragments.append(Fragment("", is_break=True))
        elif piece[0] and fragments and not fragments[-1].is_break and fragments[-1].weight == piece[1]:
            fragments[-1] = Fragment(fragments[-1].text + piece[0], piece[1])
        elif piece[0]:
            fragments.append(Fragment(piece[0], piece[1]))
    return fragments or [Fragment("")]


def check_weights(fragments: Sequence[Fragment], field: str) -> None:
    """Refuse a prompt (``field``) with an effective weight beyond ``MAX_WEIGHT`` either way, or not a number."""
    for fragment in fragments:
        if not abs(fragment.weight) <= MAX_WEIGHT:  # also NaN: an infinite weight times (text:0)
            raise invalid(field, f"{field} weights {shown(fragment.text)} by {fragment.weight:.3g}, beyond the allowed "
                          f"-{MAX_WEIGHT:g} to {MAX_WEIGHT:g}: each (bracket) multiplies by {ROUND_STEP:g} and "
                          "(text:w) by w; use fewer nested brackets or a smaller weight")


def _number(text: str) -> Optional[float]:
    """An explicit weight, or None when it is not a number (``(a:..)`` is then read as text)."""
    try:
        return float(text)
    except ValueError:
        return None


# --- Chunks of token ids ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """One window of the text encoder: BOS, 75 tokens (padded), EOS, and a weight per position."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]


def chunk_tokens(tokenizer, fragments: Sequence[Fragment]) -> list[Chunk]:
    """Tokenize weighted fragments and cut them into full windows as AUTOMATIC1111 does.

    A window holds ``model_max_length - 2`` tokens; when one fills up and a comma lies within the last
    ``COMMA_BACKTRACK`` tokens, the words after the comma move to the next window. A BREAK closes the window.
    Windows are padded with the tokenizer's pad token, exactly as the pipeline pads a short prompt, so a short
    unweighted prompt gives the same ids as ``plain``.
    """
    size = tokenizer.model_max_length - 2
    comma = tokenizer.convert_tokens_to_ids(",</w>") if ",</w>" in tokenizer.get_vocab() else None
    texts = [fragment.text for fragment in fragments if not fragment.is_break]
    encoded = iter(tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"] if texts else [])
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append(window(tokenizer, ids, weights))
        ids, weights, last_comma = [], [], -1

    for fragment in fragments:
        if fragment.is_break:
            close()
            continue
        for token in next(encoded):
            if len(ids) == size:
                if last_comma != -1 and size - last_comma <= COMMA_BACKTRACK:
                    moved_ids, moved_weights = ids[last_comma + 1:], weights[last_comma + 1:]
                    ids, weights = ids[:last_comma + 1], weights[:last_comma + 1]
                    close()
                    ids, weights = moved_ids, moved_weights
                else:
                    close()
            if token == comma:
                last_comma = len(ids)
            ids.append(token)
            weights.append(fragment.weight)
    if ids or not chunks:
        close()
    return chunks


def window(tokenizer, ids: Sequence[int], weights: Sequence[float]) -> Chunk:
    """BOS + ids + EOS, padded to the tokenizer's window with its pad token (weight 1 outside the ids)."""
    padding = tokenizer.model_max_length - 2 - len(ids)
    return Chunk((tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *[tokenizer.pad_token_id] * padding),
                 (1.0, *weights, 1.0, *[1.0] * padding))


# --- Encoders -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncoderPart:
    """One tokenizer and CLIP text encoder of a pipeline, and which of its outputs conditions the UNet."""

    tokenizer: object
    text_encoder: object
    penultimate: bool  # SDXL reads the penultimate hidden states; SD 1/2 the last, after the final layer norm
    pooled: bool  # SDXL's second encoder also gives the pooled embedding


class PromptEncoder:
    """Turns a call's prompts into ``prompt_embeds`` (and the negative and pooled ones) for one pipeline."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.xl = getattr(pipeline, "text_encoder_2", None) is not None

    def length_key(self, prompt: str, negative_prompt: Optional[str]) -> int:
        """Chunks this prompt pair needs: only pairs with equal counts share a pipeline call."""
        raise NotImplementedError

    def arguments(self, prompts: list[str], negative_prompts: list[Optional[str]]) -> dict:
        """The pipeline arguments that replace ``prompt``/``negative_prompt`` for these images (one pair each)."""
        raise NotImplementedError

    def with_embeddings(self, text: str) -> str:
        """The text with each multi-vector embedding's word spelled as all its tokens (NAME -> NAME NAME_1 ...),
        as diffusers' own prompt encoding does; unchanged without embeddings."""
        return self.pipeline.maybe_convert_prompt(text, self.pipeline.tokenizer) \
            if hasattr(self.pipeline, "maybe_convert_prompt") else text

    @property
    def zero_negative(self) -> bool:
        """SDXL's checkpoints condition on zeros when no negative prompt is given (force_zeros_for_empty_prompt)."""
        return self.xl and bool(self.pipeline.config.get("force_zeros_for_empty_prompt", False))


class A1111Encoder(PromptEncoder):
    """AUTOMATIC1111's weighting and chunking over the pipeline's own tokenizers and text encoders."""

    def __init__(self, pipeline):
        super().__init__(pipeline)
        parts = []
        if pipeline.text_encoder is not None:
            parts.append(EncoderPart(pipeline.tokenizer, pipeline.text_encoder, penultimate=self.xl, pooled=False))
        if self.xl:
            parts.append(EncoderPart(pipeline.tokenizer_2, pipeline.text_encoder_2, penultimate=True, pooled=True))
        self.parts = tuple(parts)

    def chunks(self, prompt: str, field: str = "prompt") -> list[list[Chunk]]:
        """Each part's chunks of one prompt; a Rejection naming ``field`` when a weight is out of bounds."""
        fragments = parse_a1111(self.with_embeddings(prompt))
        check_weights(fragments, field)
        return [chunk_tokens(part.tokenizer, fragments) for part in self.parts]

    def length_key(self, prompt: str, negative_prompt: Optional[str]) -> int:
        texts = {"prompt": prompt, "negative_prompt": negative_prompt}
        return max(len(chunks) for field, text in texts.items() if text is not None
                   for chunks in self.chunks(text, field))

    @torch.no_grad()
    def arguments(self, prompts: list[str], negative_prompts: list[Optional[str]]) -> dict:
        zeros = self.zero_negative
        negatives = [negative if negative is not None or zeros else "" for negative in negative_prompts]
        texts = list(dict.fromkeys([*prompts, *(negative for negative in negatives if negative is not None)]))
        chunked = {text: self.chunks(text) for text in texts}
        count = max(len(chunks) for per_part in chunked.values() for chunks in per_part)
        hidden, pooled = self._encode(texts, chunked, count)
        arguments = {"prompt_embeds": torch.stack([hidden[text] for text in prompts])}
        negative_hidden = [hidden[text] if text is not None else torch.zeros_like(hidden[prompt])
                           for text, prompt in zip(negatives, prompts)]
        arguments["negative_prompt_embeds"] = torch.stack(negative_hidden)
        if self.xl:
            arguments["pooled_prompt_embeds"] = torch.stack([pooled[text] for text in prompts])
            arguments["negative_pooled_prompt_embeds"] = torch.stack(
                [pooled[text] if text is not None else torch.zeros_like(pooled[prompt])
                 for text, prompt in zip(negatives, prompts)])
        return arguments

    def _encode(self, texts: list[str], chunked: dict, count: int) -> tuple[dict, dict]:
        """Each text's chunks through each encoder, weighted, joined along the sequence; and its pooled embedding.

        One forward pass per text (its chunks as the batch), so a text's embedding never depends on which other
        texts share the call.
        """
        hidden, pooled = {}, {}
        for text in texts:
            hidden[text], pooled_text = self._encode_text(chunked[text], count)
            if pooled_text is not None:
                pooled[text] = pooled_text
        return hidden, pooled

    def _encode_text(self, per_part: list[list[Chunk]], count: int):
        """AUTOMATIC1111's weighting of one text: hidden states x weights, then each chunk rescaled to its mean
        before weighting (only chunks that hold a weight other than 1, so unweighted text is exactly plain's)."""
        device = self.pipeline._execution_device
        states, weights, pooled = [], [], None
        for part, chunks in zip(self.parts, per_part):
            rows = _padded(chunks, count, window(part.tokenizer, [], []))
            ids = torch.tensor([row.ids for row in rows], dtype=torch.long, device=device)
            output = part.text_encoder(ids, output_hidden_states=True)
            states.append(output.hidden_states[-2] if part.penultimate else output[0])
            weights.append(torch.tensor([row.weights for row in rows], dtype=torch.float32, device=device))
            if part.pooled:
                pooled = output[0][0]  # the first chunk's
        original = torch.cat(states, dim=-1).float()
        weighted = torch.cat([part_states.float() * part_weights[..., None]
                              for part_states, part_weights in zip(states, weights)], dim=-1)
        ratio = original.mean(dim=(1, 2)) / weighted.mean(dim=(1, 2))
        changed = torch.stack([(part_weights != 1).any(dim=1) for part_weights in weights]).any(dim=0)
        ratio = torch.where(changed & torch.isfinite(ratio), ratio, torch.ones_like(ratio))
        return (weighted * ratio[:, None, None]).to(states[0].dtype).flatten(0, 1), pooled


class CompelEncoder(PromptEncoder):
    """compel's syntax and embeddings (``CompelForSD``/``CompelForSDXL``, long prompts not truncated).

    The compel objects are made per call: they cache the empty prompt's embedding, which an adapter loaded into
    the text encoder would make stale.
    """

    def _compel(self):
        from compel import CompelForSD, CompelForSDXL

        return CompelForSDXL(self.pipeline) if self.xl else CompelForSD(self.pipeline)

    def _conditioning(self, compel, prompt: str, negative_prompt: Optional[str]):
        zeros = negative_prompt is None and self.zero_negative
        return compel(self.with_embeddings(prompt),
                      negative_prompt=None if zeros else self.with_embeddings(negative_prompt or ""))

    def length_key(self, prompt: str, negative_prompt: Optional[str]) -> int:
        with torch.no_grad():
            conditioning = self._conditioning(self._compel(), prompt, negative_prompt)
        return conditioning.embeds.shape[1]

    @torch.no_grad()
    def arguments(self, prompts: list[str], negative_prompts: list[Optional[str]]) -> dict:
        compel = self._compel()
        pairs = list(dict.fromkeys(zip(prompts, negative_prompts)))
        made = {pair: self._conditioning(compel, *pair) for pair in pairs}
        picked = [made[pair] for pair in zip(prompts, negative_prompts)]
        embeds = [item.embeds for item in picked]
        negatives = [item.negative_embeds if item.negative_embeds is not None else torch.zeros_like(item.embeds)
                     for item in picked]
        padded = _pad_xl(compel, embeds + negatives) if self.xl else \
            compel.compel.pad_conditioning_tensors_to_same_length(embeds + negatives)
        embeds, negatives = padded[:len(picked)], padded[len(picked):]
        arguments = {"prompt_embeds": torch.cat(embeds), "negative_prompt_embeds": torch.cat(negatives)}
        if self.xl:
            arguments["pooled_prompt_embeds"] = torch.cat([item.pooled_embeds for item in picked])
            arguments["negative_pooled_prompt_embeds"] = torch.cat(
                [item.negative_pooled_embeds if item.negative_pooled_embeds is not None
                 else torch.zeros_like(item.pooled_embeds) for item in picked])
        return arguments


def _pad_xl(compel, conditionings: list[torch.Tensor]) -> list[torch.Tensor]:
    """SDXL conditionings (two encoders' features side by side) padded to one length with empty chunks."""
    longest = max(item.shape[1] for item in conditionings)
    if all(item.shape[1] == longest for item in conditionings):
        return conditionings
    empty = torch.cat([compel.compel_1.conditioning_provider.empty_z,
                       compel.compel_2.conditioning_provider.empty_z], dim=-1)
    return [torch.cat([item, *[empty] * ((longest - item.shape[1]) // empty.shape[1])], dim=1)
            for item in conditionings]


def _padded(chunks: list[Chunk], count: int, empty: Chunk) -> list[Chunk]:
    return chunks + [empty] * (count - len(chunks))


ENCODERS = {A1111: A1111Encoder, COMPEL: CompelEncoder}


def prompt_encoder_for(pipeline, syntax: str) -> Optional[PromptEncoder]:
    """The encoder of ``syntax`` for this pipeline (None for plain); SettingsError where the family cannot use it."""
    if syntax == PLAIN:
        return None
    if getattr(pipeline, "unet", None) is None:  # SD3 and Flux run a transformer on T5 and pooled CLIP
        raise SettingsError(
            f"model-config.yaml handler setting prompt_syntax {syntax} needs a pipeline conditioned on CLIP hidden "
            f"states only (SD 1.x/2.x, SDXL); {type(pipeline).__name__} also conditions on T5 (which reads up to max_sequence_length tokens by "
            "itself) or a pooled CLIP vector without a chunked form: set prompt_syntax plain")
    return ENCODERS[syntax](pipeline)


def rejection_for(error: Exception) -> Rejection:
    """A prompt the syntax library could not read: a 400 on the prompt instead of a failed generation."""
    if isinstance(error, Rejection):  # the syntax's own refusal, naming its field
        return error
    return invalid("prompt", f"the prompt could not be read with this model's prompt_syntax: {error}")
