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
# AUTOMATIC1111's schedule types (its ``scheduler`` field) that these choices use: "Automatic" is the sampler's own.
AUTOMATIC, KARRAS, UNIFORM = "Automatic", "Karras", "Uniform"


@dataclass(frozen=True)
class SchedulerChoice:
    """A diffusers scheduler class and the config overrides that turn it into the named sampler.

    ``kind`` says which models it fits: noise-prediction (discrete) models (SD 1/2, SDXL) or flow-matching
    models (SD3, Flux), whose configs and timesteps the other kind cannot use.
    """

    class_name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    kind: str = DISCRETE
    a1111: tuple[str, str] = ("", AUTOMATIC)  # AUTOMATIC1111's sampler name and schedule type for this choice


SCHEDULERS: dict[str, SchedulerChoice] = {
    "ddim": SchedulerChoice("DDIMScheduler", a1111=("DDIM", AUTOMATIC)),
    "pndm": SchedulerChoice("PNDMScheduler", {"skip_prk_steps": True}, a1111=("PLMS", AUTOMATIC)),
    "euler": SchedulerChoice("EulerDiscreteScheduler", a1111=("Euler", AUTOMATIC)),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler", a1111=("Euler a", AUTOMATIC)),
    # AUTOMATIC1111's DPM++ 2M runs the Karras schedule unless told otherwise (its "Automatic" is Karras).
    "dpmpp_2m": SchedulerChoice("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False},
                                a1111=("DPM++ 2M", UNIFORM)),
    "dpmpp_2m_karras": SchedulerChoice("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
                                       a1111=("DPM++ 2M", KARRAS)),
    "unipc": SchedulerChoice("UniPCMultistepScheduler", a1111=("UniPC", AUTOMATIC)),
    "lms": SchedulerChoice("LMSDiscreteScheduler", a1111=("LMS", AUTOMATIC)),
    "heun": SchedulerChoice("HeunDiscreteScheduler", a1111=("Heun", AUTOMATIC)),
    "flow_match_euler": SchedulerChoice("FlowMatchEulerDiscreteScheduler", kind=FLOW_MATCHING, a1111=("Euler", AUTOMATIC)),
}
# The schedule type AUTOMATIC1111 runs when a request leaves it at "Automatic", where it is not "Automatic".
A1111_DEFAULT_SCHEDULE = {"DPM++ 2M": KARRAS}


def a1111_sampler_label(name: str) -> str:
    """How AUTOMATIC1111's infotext names a choice: ``dpmpp_2m_karras`` -> ``DPM++ 2M Karras`` (the old-style
    name with the schedule, which A1111 and civitai read back); a choice without an A1111 twin keeps its name."""
    choice = SCHEDULERS.get(name)
    if choice is None or not choice.a1111[0]:
        return name
    sampler, schedule = choice.a1111
    return sampler if schedule in (AUTOMATIC, UNIFORM) else f"{sampler} {schedule}"


def a1111_schedule_type(name: str):
    """The infotext's ``Schedule type`` where the sampler name alone would make A1111 run another schedule."""
    choice = SCHEDULERS.get(name)
    if choice is None:
        return None
    sampler, schedule = choice.a1111
    return schedule if schedule == UNIFORM and A1111_DEFAULT_SCHEDULE.get(sampler) else None


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
