"""Does a plan fit the setup it runs in? The plan's target against what the run shows.

A plan is valid for one dtype, resolution, guidance, scheduler and scheduler config
(ALGORITHM.md §6). The runtime compares what it can observe with the plan's target and
refuses a mismatch, naming the field, the plan's value and the run's; fields named in
``allow_mismatch`` are let through with one :class:`PlanMismatchWarning` each. A field the
plan does not record (``None``, e.g. an imported reference plan's scheduler config) or that
the run does not show is not checked.
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from .plan import CachePlan, PlanError, canonical_json

# What is checked, and where it is observed.
CHECKED_FIELDS = (
    "dtype",  # the transformer's parameters: at attach time and each generation
    "resolution",  # image tokens per sample of the first call of each generation, vs plan.geometry
    "guidance",  # the pipeline call's guidance_scale, or FLUX's guidance input (guidance-distilled)
    "scheduler",  # the pipeline scheduler's class: at attach time and each generation
    "scheduler_config_hash",  # sha256 of its public config: at attach time and each generation
)


class PlanMismatchError(PlanError):
    """The plan was calibrated for another setup than the one it is asked to run in."""


class PlanMismatchWarning(UserWarning):
    """A plan runs in another setup than its own, allowed by ``allow_mismatch``."""


class SetupGuard:
    """Compares planned and observed setup values; refuses, or warns once per allowed field."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        if isinstance(allow, str):
            allow = {allow}
        self.allow = frozenset(allow)
        unknown = self.allow - set(CHECKED_FIELDS)
        if unknown:
            raise ValueError(
                f"allow_mismatch: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(CHECKED_FIELDS)})"
            )
        self.warned: set[str] = set()

    def check(self, name: str, planned: Any, observed: Any, same: bool | None = None, show=None) -> None:
        """Raise :class:`PlanMismatchError` if ``planned != observed`` (unless allowed).

        ``same`` overrides the equality test; ``show`` formats values for the message.
        """
        if planned is None or observed is None:
            return  # not recorded by the plan, or not observable in this run
        if same is None:
            same = planned == observed
        if same:
            return
        show = show or str
        message = f"{name}: the plan was calibrated for {show(planned)}, this run uses {show(observed)}"
        if name in self.allow:
            if name not in self.warned:
                self.warned.add(name)
                warnings.warn(f"{message} (allowed by allow_mismatch)", PlanMismatchWarning, stacklevel=2)
            return
        raise PlanMismatchError(
            f"{message}; calibrate or fetch a plan for this setup, or pass allow_mismatch={{{name!r}}} "
            "to reuse this one knowingly"
        )

    # ---- the checks --------------------------------------------------------------------
    def model(self, plan: CachePlan, transformer: torch.nn.Module) -> None:
        """dtype of the transformer's weights."""
        self.check("dtype", plan.target.dtype, model_dtype(transformer))

    def scheduler(self, plan: CachePlan, scheduler) -> None:
        """Class and config of the pipeline's scheduler."""
        if scheduler is None:
            return
        self.check("scheduler", plan.target.scheduler, type(scheduler).__name__)
        if plan.target.scheduler_config_hash is not None:
            observed = scheduler_config_hash(scheduler)
            self.check("scheduler_config_hash", plan.target.scheduler_config_hash, observed, show=lambda h: h[:12])

    def call(self, plan: CachePlan, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """What the first transformer call of a generation shows: resolution, FLUX guidance input."""
        tokens = image_tokens(plan.arch, transformer, args, kwargs)
        if plan.geometry is not None and tokens is not None:
            self.check("resolution", plan.geometry.tokens, tokens, show=lambda n: _describe_tokens(plan, n))
        guidance = kwargs.get("guidance")
        if isinstance(guidance, torch.Tensor) and guidance.numel():
            self.guidance(plan, float(guidance.reshape(-1)[0]), torch.finfo(guidance.dtype).eps)

    def guidance(self, plan: CachePlan, observed: float | None, eps: float = 1e-6) -> None:
        """The guidance scale of a generation (``None``: not observable)."""
        if observed is None or plan.target.guidance is None:
            return
        planned = float(plan.target.guidance)
        same = math.isclose(planned, float(observed), rel_tol=max(eps, 1e-6), abs_tol=1e-9)
        self.check("guidance", planned, float(observed), same=same, show=lambda g: f"guidance {g:g}")


# ---- observations --------------------------------------------------------------------------
def model_dtype(transformer: torch.nn.Module) -> str:
    """``"float32"``, ``"bfloat16"``, ... of the transformer's first parameter."""
    return str(next(transformer.parameters()).dtype).replace("torch.", "")


def image_tokens(arch: str, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> int | None:
    """Image tokens per sample of one transformer call (DiT: latent grid / patch; FLUX: sequence)."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        return None
    if arch == "dit":
        patch = int(getattr(transformer.config, "patch_size", 1) or 1)
        return (hidden.shape[-2] // patch) * (hidden.shape[-1] // patch)
    return int(hidden.shape[1])


def calling_argument(owner: Any, name: str) -> Any:
    """The value of argument ``name`` of the ``owner.__call__`` now running up the stack (or None).

    Pipelines keep ``guidance_scale`` as a local of their ``__call__``; this reads it once
    per generation, when the scheduler's timesteps are set.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__call__" and frame.f_locals.get("self") is owner:
            return frame.f_locals.get(name)
        frame = frame.f_back
    return None


def scheduler_config_hash(scheduler) -> str:
    """sha256 of the scheduler's public config, canonical JSON."""
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return hashlib.sha256(canonical_json(jsonable(config))).hexdigest()


def jsonable(value: Any) -> Any:
    """``value`` with tensors as lists and unknown objects as their repr (JSON-compatible)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _describe_tokens(plan: CachePlan, tokens: int) -> str:
    target = plan.target
    if tokens == plan.geometry.tokens and target.height and target.width:
        return f"{target.height}x{target.width} ({tokens} image tokens per sample)"
    return f"{tokens} image tokens per sample"
