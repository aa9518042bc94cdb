"""The schedulers a request may name, each built per call from the pipeline's own scheduler config.

Pipelines keep per-call state on their scheduler, so a request never swaps the shared one: it gets a fresh
instance made from the loaded pipeline's config (beta schedule, prediction type, timestep spacing), which is
what makes a Stable Diffusion 2 v-prediction model keep working under any of these names.
"""

from dataclasses import dataclass, field
from typing import Any

import diffusers


DISCRETE = "discrete"
FLOW_MATCHING = "flow_matching"


@dataclass(frozen=True)
class SchedulerChoice:
    """A diffusers scheduler class and the config overrides that turn it into the named sampler.

    ``kind`` says which models it fits: noise-prediction (discrete) models (SD 1/2, SDXL) or flow-matching
    models (SD3, Flux), whose configs and timesteps the other kind cannot use.
    """

    class_name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    kind: str = DISCRETE


SCHEDULERS: dict[str, SchedulerChoice] = {
    "ddim": SchedulerChoice("DDIMScheduler"),
    "pndm": SchedulerChoice("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": SchedulerChoice("EulerDiscreteScheduler"),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler"),
    "dpmpp_2m": SchedulerChoice("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpmpp_2m_karras": SchedulerChoice("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": SchedulerChoice("UniPCMultistepScheduler"),
    "lms": SchedulerChoice("LMSDiscreteScheduler"),
    "heun": SchedulerChoice("HeunDiscreteScheduler"),
    "flow_match_euler": SchedulerChoice("FlowMatchEulerDiscreteScheduler", kind=FLOW_MATCHING),
}


def scheduler_kind(scheduler) -> str:
    """Whether a loaded scheduler is a flow-matching one (SD3, Flux) or a discrete noise-prediction one."""
    return FLOW_MATCHING if "FlowMatch" in type(scheduler).__name__ else DISCRETE


def scheduler_name_of(scheduler) -> str:
    """The request name of a loaded scheduler (its class name where no named choice matches its config)."""
    for name, choice in SCHEDULERS.items():
        if type(scheduler).__name__ == choice.class_name and all(
                scheduler.config.get(key) == value for key, value in choice.overrides.items()):
            return name
    return type(scheduler).__name__


def scheduler_names(kind: str) -> tuple[str, ...]:
    """The names a request may use with a model whose scheduler is of ``kind``."""
    return tuple(name for name, choice in SCHEDULERS.items() if choice.kind == kind)


class SchedulerFactory:
    """Makes a fresh scheduler per pipeline call; the configs are merged once, at start-up."""

    def __init__(self, base_scheduler):
        self._base_scheduler = base_scheduler
        self._configs = {}
        for name in scheduler_names(scheduler_kind(base_scheduler)):
            choice = SCHEDULERS[name]
            scheduler_class = getattr(diffusers, choice.class_name)
            self._configs[name] = (scheduler_class, {**base_scheduler.config, **choice.overrides})

    def create(self, name):
        """A new scheduler instance: the named one, or a copy of the pipeline's own when name is None."""
        if name is None:
            return type(self._base_scheduler).from_config(self._base_scheduler.config)
        scheduler_class, config = self._configs[name]
        return scheduler_class.from_config(config)
