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


def timestep_argument(forward) -> tuple[int | None, str]:
    """Where a transformer's forward takes ``timestep``: (positional index, keyword name)."""
    params = list(inspect.signature(forward).parameters)
    if "timestep" not in params:
        raise ValueError("transformer forward has no 'timestep' argument")
    return params.index("timestep"), "timestep"


def find_timestep(position: int, args: tuple, kwargs: dict) -> Any:
    """The timestep argument of one forward call."""
    if "timestep" in kwargs:
        return kwargs["timestep"]
    if len(args) > position:
        return args[position]
    raise StepMatchError("the transformer was called without a timestep")
