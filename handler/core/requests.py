"""The typed request the generation core runs: validated once at the edge, trusted inside."""

from dataclasses import dataclass, field
from typing import Optional

from PIL import Image

from handler.core.capabilities import IMAGE_TO_IMAGE, INPAINTING, TEXT_TO_IMAGE
from handler.core.controlnets import ControlCondition

MAX_SEED = 2**63 - 1  # torch.Generator seeds are 64-bit; JSON clients keep them as signed integers


@dataclass(frozen=True)
class ImagePrompt:
    """An IP-Adapter's image prompt: which adapter, the decoded image, and how strongly it steers."""

    name: str
    image: Image.Image = field(compare=False)
    scale: float


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate for one client request, validated: the core trusts every value."""

    prompt: str
    negative_prompt: Optional[str]
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    seeds: tuple[int, ...]
    scheduler: Optional[str]  # None: the pipeline's own scheduler
    timeout_seconds: Optional[float] = None  # counted from when the worker received the request
    preview_every: int = 0  # 0: no previews
    image: Optional[Image.Image] = field(default=None, compare=False)
    mask_image: Optional[Image.Image] = field(default=None, compare=False)
    strength: Optional[float] = None
    loras: tuple[tuple[str, float], ...] = ()  # (name, scale) sorted by name; () for the base model
    control: Optional[ControlCondition] = None
    ip_adapter: Optional[ImagePrompt] = None
    prompt_translated: Optional[str] = None  # set by the translator (handler/model/translation.py)
    negative_prompt_translated: Optional[str] = None

    @property
    def model_prompt(self) -> str:
        """The prompt the model reads: the translation, where there is one."""
        return self.prompt if self.prompt_translated is None else self.prompt_translated

    @property
    def model_negative_prompt(self) -> Optional[str]:
        return self.negative_prompt if self.negative_prompt_translated is None else self.negative_prompt_translated

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def task(self) -> str:
        if self.mask_image is not None:
            return INPAINTING
        if self.image is not None:
            return IMAGE_TO_IMAGE
        return TEXT_TO_IMAGE

    @property
    def pixels(self) -> int:
        """The memory-relevant size: pixels of every image this request makes."""
        return self.width * self.height * self.num_images

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call (a deadline stops a call: only equal ones share)."""
        return (self.task, self.width, self.height, self.num_inference_steps, self.guidance_scale,
                self.scheduler, self.strength, self.negative_prompt is not None, self.timeout_seconds,
                self.loras, self.control.batch_key() if self.control is not None else None,
                (self.ip_adapter.name, self.ip_adapter.scale) if self.ip_adapter is not None else None)
