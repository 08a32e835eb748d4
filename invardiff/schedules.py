"""Fixed schedules: plans that reuse whole steps at given positions, with no calibration.

``every_k_plan(template, k)`` computes steps 0, k, 2k, ... and the last step and reuses every
other step whole (the simplest baseline a calibrated plan has to beat). ``gate_plan`` turns
any step gate into a plan for the template's model and target. Pure numpy: no torch.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .plan import CachePlan


def every_k_gate(steps: int, k: int) -> np.ndarray:
    """Step gate ``[steps]`` (True = reuse) computing every k-th step from 0, and the last."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if steps < 2:
        raise ValueError(f"a schedule needs at least 2 steps, got {steps}")
    gate = np.ones(steps, dtype=bool)
    gate[::k] = False
    gate[-1] = False
    return gate


def spaced_gate(steps: int, computed: int) -> np.ndarray:
    """Step gate computing ``computed`` steps spread as evenly as possible over the schedule.

    Always computes step 0 and the last step; ``computed`` is clipped to ``[2, steps]``.
    """
    if steps < 2:
        raise ValueError(f"a schedule needs at least 2 steps, got {steps}")
    computed = min(max(int(computed), 2), steps)
    positions = np.unique(np.round(np.linspace(0, steps - 1, computed)).astype(int))
    gate = np.ones(steps, dtype=bool)
    gate[positions] = False
    return gate


def gate_plan(
    template: CachePlan, gate: np.ndarray, calibration: dict | None = None, step_reuse: str = "hold"
) -> CachePlan:
    """A plan for ``template``'s model and target that reuses exactly the steps in ``gate``.

    Module flags are True on reused steps (nothing runs there) and False elsewhere, so every
    computed step computes every module. ``calibration`` replaces the template's provenance;
    ``step_reuse`` is the reused steps' rule (``"hold"``, or ``"linear"``: docs/step-reuse.md).
    """
    gate = np.asarray(gate, dtype=bool)
    if gate.shape != (template.steps,):
        raise ValueError(f"step gate has shape {gate.shape}, the plan has {template.steps} steps")
    modules = {kind: np.repeat(gate[:, None], layers, axis=1) for kind, layers in template.layer_counts().items()}
    return replace(
        template,
        step_gate=gate,
        modules=modules,
        calibration=dict(calibration or {}),
        extras={},
        step_reuse=step_reuse,
    )


def every_k_plan(template: CachePlan, k: int) -> CachePlan:
    """Compute every k-th step (and the last), reuse the steps between whole.

    ``template`` supplies architecture, layer counts, target and geometry (any plan for the
    model, e.g. ``all_compute_plan(...)`` or a calibrated one); its flags are ignored.
    """
    return gate_plan(template, every_k_gate(template.steps, k), {"schedule": "every-k", "k": int(k)})
