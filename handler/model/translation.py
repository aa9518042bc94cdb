"""Prompt translation: a transformers translation model packed in the archive (``build_mar.sh --translator``).

A MarianMT folder such as Helsinki-NLP/opus-mt-zh-en is loaded once per worker, offline, from
``<model_dir>/translator``. The setting ``translate`` decides which prompts it reads: ``auto`` (the default)
those with CJK characters (Chinese, Japanese kana, Korean Hangul), ``always`` every prompt, ``never`` none (the
translator is then not even loaded). A prompt and its negative prompt are translated separately, each text in
its own ``generate`` call, so a translation never depends on the other requests of a batch; the request keeps
what the client sent as ``prompt`` and carries the translation as ``prompt_translated``, which the model reads
and the answer reports. Translation runs before the prompt syntax is read: weights such as ``(word:1.3)`` are
part of the text the translator sees.
"""

import logging
import re
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Optional

from handler.core.contract import GenerationRequest
from handler.core.failures import INTERNAL_ERROR, Rejection
from handler.core.settings import SettingsError

logger = logging.getLogger(__name__)

TRANSLATOR_FOLDER = "translator"
AUTO, ALWAYS, NEVER = "auto", "always", "never"
CJK = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\U00020000-\U0002fa1f]")
CACHED_TRANSLATIONS = 512


def has_cjk(text: str) -> bool:
    """Whether ``text`` holds a Chinese, Japanese or Korean letter (punctuation alone does not count)."""
    return CJK.search(text) is not None


class PromptTranslator:
    """A loaded translation model and the rule of which prompts it translates."""

    def __init__(self, folder: Path, mode: str, device: str = "cpu"):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        started = time.perf_counter()
        self.mode = mode
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True,
                                                           use_safetensors=True).to(device).eval()
        self.device = device
        self.translate = lru_cache(maxsize=CACHED_TRANSLATIONS)(self._translate)
        logger.info("loaded the translator %s from %s on %s in %.2f s", type(self.model).__name__, folder, device,
                    time.perf_counter() - started)

    def wants(self, text: Optional[str]) -> bool:
        """Whether this text is to be translated under the ``translate`` setting."""
        if text is None or not text.strip():
            return False
        return self.mode == ALWAYS or (self.mode == AUTO and has_cjk(text))

    def _translate(self, text: str) -> str:
        import torch

        inputs = self.tokenizer([text], return_tensors="pt", truncation=True).to(self.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs)
        return self.tokenizer.decode(output[0], skip_special_tokens=True).strip()

    def apply(self, items: list) -> list:
        """Each GenerationRequest with its translations set where the setting asks; anything else as it was.

        A translation that fails costs its request only (an internal error), never the batch.
        """
        started, count = time.perf_counter(), 0
        translated = []
        for item in items:
            if not isinstance(item, GenerationRequest):
                translated.append(item)
                continue
            try:
                changes = {}
                if self.wants(item.prompt):
                    changes["prompt_translated"] = self.translate(item.prompt)
                if self.wants(item.negative_prompt):
                    changes["negative_prompt_translated"] = self.translate(item.negative_prompt)
            except Exception:
                logger.exception("translating a prompt failed")
                translated.append(Rejection(INTERNAL_ERROR, "translating the prompt failed; the server log has "
                                            "the details"))
                continue
            count += len(changes)
            translated.append(replace(item, **changes) if changes else item)
        if count:
            logger.info("translated %d prompt(s) in %.2f s", count, time.perf_counter() - started)
        return translated


def load_translator(model_dir: Path, mode: str, device: str) -> Optional[PromptTranslator]:
    """The archive's translator, if it packs one and ``translate`` is not ``never``.

    ``always`` without a packed translator is a configuration error: the model load fails with the fix.
    """
    folder = Path(model_dir) / TRANSLATOR_FOLDER
    if mode == NEVER:
        return None
    if not (folder / "config.json").is_file():
        if mode == ALWAYS:
            raise SettingsError(f"model-config.yaml handler setting translate is always but the archive holds no "
                                f"translator ({TRANSLATOR_FOLDER}/): build it with build_mar.sh --translator PATH, or "
                                "set translate to auto or never")
        return None
    return PromptTranslator(folder, mode, device)
