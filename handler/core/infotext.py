"""AUTOMATIC1111's "infotext": the ``parameters`` text that A1111's PNG Info, civitai and image browsers read.

Its layout (A1111's ``processing.create_infotext``): the prompt, then a line ``Negative prompt: ...`` when
there is one, then one line of ``Key: value`` pairs joined by ``", "`` in A1111's order: ``Steps``,
``Sampler``, ``Schedule type``, ``CFG scale``, ``Seed``, ``Size``, ``Model``, ``Denoising strength``,
``Lora hashes``. A value holding a comma, a colon or a newline is written as a JSON string (A1111's
``infotext_utils.quote``). Schedulers are named as A1111 names them (``dpmpp_2m_karras`` -> ``DPM++ 2M Karras``).
"""

import json
from typing import Any, Mapping

from handler.core.schedulers import a1111_sampler_label, a1111_schedule_type


def infotext(parameters: Mapping[str, Any], seed: int) -> str:
    """The infotext of one image, from a result's ``parameters()`` and the image's own seed."""
    scheduler = parameters.get("scheduler")
    loras = parameters.get("lora_hashes") or {}
    values = {
        "Steps": parameters.get("num_inference_steps"),
        "Sampler": a1111_sampler_label(scheduler) if scheduler else None,
        "Schedule type": a1111_schedule_type(scheduler) if scheduler else None,
        "CFG scale": parameters.get("guidance_scale"),
        "Seed": seed,
        "Size": f"{parameters['width']}x{parameters['height']}" if "width" in parameters else None,
        "Model": parameters.get("model"),
        "Denoising strength": parameters.get("strength"),
        "Lora hashes": ", ".join(f"{_lora_name(name)}: {digest}" for name, digest in loras.items()) or None,
    }
    line = ", ".join(f"{key}: {quote(value)}" for key, value in values.items() if value is not None)
    prompt = parameters.get("prompt") or ""
    negative = parameters.get("negative_prompt")
    return prompt + (f"\nNegative prompt: {negative}" if negative else "") + f"\n{line}"


def quote(value) -> str:
    """A1111's quoting: as is, unless a comma, colon or newline would break the line; then a JSON string."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _lora_name(name: str) -> str:
    """A1111 writes LoRA names without the separators of its ``Lora hashes`` list."""
    return name.replace(":", "").replace(",", "")
