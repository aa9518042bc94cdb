"""Watch a pipeline call step by step: progress events for the requests in it, and their shared deadline.

diffusers calls ``callback_on_step_end`` after every denoising step; a ``StepWatcher`` is that callback for one
pipeline call. It tells each request of the call how far the call is (``total`` is the number of callbacks the
pipeline will make: ``len(timesteps)``, which is not ``num_inference_steps`` for second-order schedulers or
image-to-image), with a preview on the steps a request asked for one, and it stops the call by raising
``DeadlineExceeded`` once the call's deadline has passed, so the worker is free at once (no final decode).
"""

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


class DeadlineExceeded(Exception):
    """A pipeline call ran past its requests' ``timeout_seconds``."""


@dataclass(frozen=True)
class Progress:
    """One denoising step of a request's pipeline call."""

    step: int  # 1-based: the number of steps done
    total: int
    elapsed_ms: float  # since the worker received the request's batch
    eta_ms: float
    preview: Optional[np.ndarray] = None  # uint8 latent-sized RGB of the request's first image


@dataclass(frozen=True)
class Watched:
    """A request of the call, as the watcher sees it: where its images start and how often it wants a preview."""

    position: int  # the request's index in the batch
    first_image: int  # its first image's index in the call
    preview_every: int


class StepWatcher:
    """``callback_on_step_end`` for one pipeline call."""

    def __init__(self, members: list[Watched], started: float, deadline: Optional[float], size: tuple[int, int],
                 on_progress: Optional[Callable[[int, Progress], None]], previewer=None):
        self.members = members
        self.started = started
        self.deadline = deadline
        self.width, self.height = size
        self.on_progress = on_progress
        self.previewer = previewer
        self.loop_started = None

    def __call__(self, pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        now = time.perf_counter()
        if self.deadline is not None and now > self.deadline:
            raise DeadlineExceeded(f"stopped after {step + 1} step(s)")
        if self.on_progress is None:
            return callback_kwargs
        if self.loop_started is None:  # the first step's end: the time per step is measured from here on
            self.loop_started = now
        done, total = step + 1, pipeline.num_timesteps
        per_step = (now - self.loop_started) / (done - 1) if done > 1 else now - self.started
        for member in self.members:
            preview = None
            if member.preview_every and done % member.preview_every == 0 and self.previewer is not None:
                preview = self.previewer.preview(callback_kwargs["latents"], member.first_image, self.height,
                                                 self.width)
            self.on_progress(member.position, Progress(done, total, round((now - self.started) * 1000, 1),
                                                       round(per_step * (total - done) * 1000, 1), preview))
        return callback_kwargs
