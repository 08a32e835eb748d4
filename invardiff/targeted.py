"""Budget-targeted calibration of a pipeline: phase-1 statistics, held-out fidelity, search.

``calibrate(pipeline, calls, target_speedup=X)`` or ``min_psnr=Y`` lands here (``mode="budget"``).
Only phase 1 runs (N trajectories: the drift statistics); candidates are then measured on
held-out calls (the calibration calls with fresh seeds unless ``holdout`` is given).
"""

from __future__ import annotations

from typing import Any

from .budget import Measure, budget_plan
from .calibration import (
    CalibrationParams,
    Runner,
    _jsonable,
    describe_target,
    merge_scores,
    provenance,
    trajectory_stats,
)
from .holdout import check_disjoint, holdout_calls, holdout_measure
from .plan import CachePlan, all_compute_plan
from .recording import HIDDEN


def template_plan(pipeline, calls: list[dict[str, Any]], phase1: list, model_id=None, revision=None) -> CachePlan:
    """An all-compute plan carrying the target, geometry and layer counts of a calibration
    (what the budget search fills with a schedule)."""
    first = min(phase1, key=lambda s: s.index)
    layers = {kind: int(scores.shape[1]) for kind, scores in first.scores.items() if kind != HIDDEN}
    arch = "flux" if "single_attn" in layers else "dit"
    target = describe_target(pipeline, calls, first.timesteps, model_id=model_id, revision=revision)
    return all_compute_plan(arch, len(first.timesteps), layers, target, geometry=first.geometry)


def calibrate_to_budget(
    pipeline,
    transformer,
    run: Runner,
    calls: list[dict[str, Any]],
    steps: int,
    settings: CalibrationParams,
    *,
    target_speedup: float | None,
    min_psnr: float | None,
    holdout: list[dict[str, Any]] | None,
    measure: Measure | None,
    model_id=None,
    revision=None,
    say=lambda message: None,
) -> CachePlan:
    """Phase 1 on ``calls``, then :func:`invardiff.budget.budget_plan` with a held-out measure."""
    if target_speedup is not None and target_speedup > steps / 2:
        raise ValueError(f"target_speedup {target_speedup:g} is unreachable: at most {steps / 2:g}x with {steps} steps "
                         "(the first and last step are always computed)")  # fmt: skip
    held = None
    if measure is None:
        if transformer is pipeline:
            raise ValueError("a bare transformer cannot be measured on held-out calls: pass measure=...")
        held = holdout_calls(calls) if holdout is None else holdout
        check_disjoint(calls, held)
    phase1 = []
    for i, call in enumerate(calls):
        say(f"phase 1: trajectory {i + 1}/{len(calls)}")
        phase1.append(trajectory_stats(transformer, run, call, i, steps, settings))
    record = {**provenance(calls, settings), "params": {"flag_index": settings.flag_index}, "holdout": None}
    if held is not None:
        say(f"held-out fidelity on {len(held)} call(s)")
        measure = holdout_measure(pipeline, held)
        record["holdout"] = _jsonable(held)
    template = template_plan(pipeline, calls, phase1, model_id=model_id, revision=revision)
    return budget_plan(template, merge_scores(phase1), target_speedup=target_speedup, min_psnr=min_psnr,
                       measure=measure, flag_index=settings.flag_index, provenance=record)  # fmt: skip
