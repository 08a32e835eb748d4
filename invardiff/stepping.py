"""Which denoising step a transformer call belongs to, from the timestep it is called with.

Counting calls breaks under CFG-as-two-calls, img2img starting mid-schedule and repeated
generations, so the step is always the index of the called timestep in the schedule.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class StepMatchError(RuntimeError):
    """A transformer call whose timestep matches no step of the plan's schedule."""


def timestep_value(timestep: Any) -> tuple[float, float]:
    """The (scalar) timestep of a call and the relative tolerance its dtype allows."""
    if isinstance(timestep, torch.Tensor):
        flat = timestep.detach().reshape(-1).cpu()  # the one device sync per call
        value = float(flat[0])
        eps = torch.finfo(timestep.dtype).eps if timestep.dtype.is_floating_point else 0.0
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise StepMatchError("the batch mixes different timesteps; a cache plan needs one step per call")
        return value, eps
    value = float(timestep)
    return value, (np.finfo(np.float32).eps if isinstance(timestep, float) else 0.0)


def match_step(value: float, eps: float, schedule: Sequence[float]) -> int:
    """Index of ``value`` in ``schedule`` within the dtype's rounding, or StepMatchError."""
    sched = np.asarray(schedule, dtype=np.float64)
    tolerance = np.maximum(eps * np.abs(sched), 1e-9)
    hits = np.flatnonzero(np.abs(sched - value) <= tolerance)
    if len(hits) == 1:
        return int(hits[0])
    if len(hits) == 0:
        raise StepMatchError(
            f"timestep {value:g} is not in the plan's schedule "
            f"({len(sched)} steps, {sched[0]:g} .. {sched[-1]:g}); the plan does not fit this sampler"
        )
    raise StepMatchError(f"timestep {value:g} matches several steps of the schedule; cannot tell which")


def timestep_argument(forward) -> int:
    """The positional index of ``timestep`` in a transformer's forward."""
    params = list(inspect.signature(forward).parameters)
    if "timestep" not in params:
        raise ValueError("transformer forward has no 'timestep' argument")
    return params.index("timestep")


def find_timestep(position: int, args: tuple, kwargs: dict) -> Any:
    """The timestep argument of one forward call."""
    if "timestep" in kwargs:
        return kwargs["timestep"]
    if len(args) > position:
        return args[position]
    raise StepMatchError("the transformer was called without a timestep")


class StepTracker:
    """Finds the step of each transformer call in a schedule.

    Without a scheduler (``progress`` None) every call is matched by its timestep value. With
    the pipeline's scheduler, the step is the scheduler's progress (``begin`` + calls of
    ``scheduler.step`` since ``set_timesteps``), and the called timestep is still checked
    against it: at once for CPU timesteps, and for accelerator timesteps on the device, read
    back once per generation (at its last step), so the sampling loop never waits for the
    accelerator. A repeated call at one step (CFG as two calls) is matched by value.
    ``defer_cpu`` treats CPU timesteps like accelerator ones (to test the deferred path).
    """

    def __init__(self, schedule: Sequence[float] | None, defer_cpu: bool = False) -> None:
        self.schedule = None if schedule is None else list(schedule)
        self.defer_cpu = defer_cpu
        self.progress: int | None = None
        self.begin = 0
        self.last = -1
        self._pending: torch.Tensor | None = None
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def start_generation(self, schedule: Sequence[float] | None = None, begin: int = 0) -> None:
        """A new generation under the scheduler's control (its set_timesteps was called)."""
        self.check()
        if schedule is not None:
            self.schedule = list(schedule)
            self._on_device = {}
        self.progress, self.begin, self.last = 0, begin, -1

    def abandon(self) -> None:
        """The generation in progress failed: forget its last step and its pending device check."""
        self.last = -1
        self._pending = None

    def advance(self) -> None:
        """The scheduler finished a step."""
        if self.progress is not None:
            self.progress += 1

    def locate(self, timestep: Any) -> int:
        """The step index of a call with ``timestep`` (StepMatchError if it fits none)."""
        if self.schedule is None:
            raise StepMatchError("no schedule yet: the pipeline's scheduler has not set its timesteps")
        predicted = None if self.progress is None else self.begin + self.progress
        on_device = isinstance(timestep, torch.Tensor) and (self.defer_cpu or timestep.device.type != "cpu")
        if predicted is None or not on_device or predicted == self.last or predicted >= len(self.schedule):
            step = match_step(*timestep_value(timestep), self.schedule)
            if predicted is not None and not on_device and step != predicted and step != self.last:
                raise StepMatchError(
                    f"timestep {self.schedule[step]:g} is step {step} of the schedule, but the scheduler is at "
                    f"step {predicted}; the sampling loop and the scheduler disagree"
                )
        else:
            step = predicted
            self._defer_check(timestep, step)
            if step == len(self.schedule) - 1:
                self.check()
        self.last = step
        return step

    def _defer_check(self, timestep: torch.Tensor, step: int) -> None:
        device = timestep.device
        if device not in self._on_device:
            values = torch.tensor(self.schedule, dtype=torch.float64)
            eps = torch.finfo(timestep.dtype).eps if timestep.dtype.is_floating_point else 0.0
            tolerance = torch.clamp(values.abs() * eps, min=1e-9)
            self._on_device[device] = (values.to(device, torch.float32), tolerance.to(device, torch.float32))
        values, tolerance = self._on_device[device]
        wrong = ((timestep.detach().reshape(-1).float() - values[step]).abs() > tolerance[step]).any()
        self._pending = wrong if self._pending is None else self._pending | wrong

    def check(self) -> None:
        """Raise StepMatchError if a deferred device-side check failed (one sync)."""
        pending, self._pending = self._pending, None
        if pending is not None and bool(pending):
            raise StepMatchError(
                "a transformer call's timestep did not match the scheduler's step: the plan does not fit this "
                "sampling loop (the generation ran with wrong reuse decisions)"
            )
