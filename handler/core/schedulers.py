"""The schedulers a request may name, each built per call from the pipeline's own scheduler config.

Pipelines keep per-call state on their scheduler, so a request never swaps the shared one: it gets a fresh
instance made from the loaded pipeline's config (beta schedule, prediction type, timestep spacing), which is
what makes a Stable Diffusion 2 v-prediction model keep working under any of these names.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

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
    a1111: tuple[str, str]  # AUTOMATIC1111's sampler name and schedule type that run the same sampler
    overrides: dict[str, Any] = field(default_factory=dict)
    kind: str = DISCRETE


SCHEDULERS: dict[str, SchedulerChoice] = {
    "ddim": SchedulerChoice("DDIMScheduler", ("DDIM", AUTOMATIC)),
    "pndm": SchedulerChoice("PNDMScheduler", ("PLMS", AUTOMATIC), {"skip_prk_steps": True}),
    "euler": SchedulerChoice("EulerDiscreteScheduler", ("Euler", AUTOMATIC)),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler", ("Euler a", AUTOMATIC)),
    # AUTOMATIC1111's DPM++ 2M runs the Karras schedule unless told otherwise (its "Automatic" is Karras).
    "dpmpp_2m": SchedulerChoice("DPMSolverMultistepScheduler", ("DPM++ 2M", UNIFORM),
                                {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpmpp_2m_karras": SchedulerChoice("DPMSolverMultistepScheduler", ("DPM++ 2M", KARRAS),
                                       {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": SchedulerChoice("UniPCMultistepScheduler", ("UniPC", AUTOMATIC)),
    "lms": SchedulerChoice("LMSDiscreteScheduler", ("LMS", AUTOMATIC)),
    "heun": SchedulerChoice("HeunDiscreteScheduler", ("Heun", AUTOMATIC)),
    "flow_match_euler": SchedulerChoice("FlowMatchEulerDiscreteScheduler", ("Euler", AUTOMATIC), kind=FLOW_MATCHING),
}
# The schedule type AUTOMATIC1111 runs when a request leaves it at "Automatic", where it is not "Automatic".
A1111_DEFAULT_SCHEDULE = {"DPM++ 2M": KARRAS}
# AUTOMATIC1111's other spellings of its sampler names (its sd_samplers aliases).
A1111_SAMPLER_ALIASES = {
    "Euler a": ("k_euler_a", "k_euler_ancestral"), "Euler": ("k_euler",), "LMS": ("k_lms",), "Heun": ("k_heun",),
    "DPM++ 2M": ("k_dpmpp_2m",), "DDIM": ("ddim",), "PLMS": ("plms",), "UniPC": ("unipc",),
}
# Its schedule types by name and label (its /sdapi/v1/schedulers list), for the ones these choices use.
A1111_SCHEDULES = {AUTOMATIC: "automatic", KARRAS: "karras", UNIFORM: "uniform"}


def a1111_samplers(available: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """AUTOMATIC1111's sampler names that the ``available`` choices run -> their aliases, in A1111's order."""
    names = [SCHEDULERS[name].a1111[0] for name in available]
    return {name: A1111_SAMPLER_ALIASES.get(name, ()) for name in dict.fromkeys(names)}


def from_a1111(sampler: str, schedule: Optional[str], available: tuple[str, ...]) -> Optional[str]:
    """The choice that runs A1111's ``sampler`` (a name, an alias, or an old name with its schedule such as
    ``DPM++ 2M Karras``) with ``schedule`` (a schedule type's name or label; None or Automatic: the sampler's
    own), among ``available``; None when none does."""
    wanted, given = sampler.strip().lower(), (schedule or AUTOMATIC).strip().lower()
    label = next((label for label, name in A1111_SCHEDULES.items() if given in (label.lower(), name)), None)
    if label is None:
        return None
    suffix = " " + KARRAS.lower()  # the names before A1111 1.9 carried the Karras schedule
    if wanted.endswith(suffix) and label in (AUTOMATIC, KARRAS):
        wanted, label = wanted[:-len(suffix)], KARRAS
    for name in available:
        a1111_name, a1111_schedule = SCHEDULERS[name].a1111
        if wanted in (a1111_name.lower(), *A1111_SAMPLER_ALIASES.get(a1111_name, ())):
            runs = A1111_DEFAULT_SCHEDULE.get(a1111_name, AUTOMATIC) if label == AUTOMATIC else label
            if runs == a1111_schedule:
                return name
    return None


def a1111_sampler_label(name: str) -> str:
    """How AUTOMATIC1111's infotext names a choice: ``dpmpp_2m_karras`` -> ``DPM++ 2M Karras`` (the old-style
    name with the schedule, which A1111 and civitai read back)."""
    choice = SCHEDULERS.get(name)
    if choice is None:  # a scheduler the pipeline came with, named by its class
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
