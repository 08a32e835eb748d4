"""Budget-targeted calibration of a pipeline: phase-1 statistics, held-out fidelity, search.

``calibrate(pipeline, calls, target_speedup=X)``, ``min_psnr=Y`` or ``min_psnr_p5=Z`` lands
here (``mode="budget"``). Only phase 1 runs (N trajectories: the drift statistics); candidates
are then ranked on the selection calls and the returned plan is certified on the certification
calls (defaults: the calibration calls with fresh seeds each; :mod:`invardiff.holdout`).
"""

from __future__ import annotations

from typing import Any

from .budget import budget_plan, describe_targets
from .calibration import (
    CalibrationParams,
    Runner,
    describe_target,
    merge_scores,
    provenance,
    trajectory_stats,
)
from .certify import P5_SAMPLES, Measure
from .checks import jsonable
from .holdout import held_out_sets, holdout_measure
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


def budget_record(
    calls: list[dict[str, Any]],
    settings: CalibrationParams,
    selection: list[dict[str, Any]] | None,
    certification: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    """The provenance a budget plan starts from (in-process and on the fleet alike): the
    calibration's, its selection calls (``holdout``) and its certification calls."""
    return {**provenance(calls, settings), "params": {"flag_index": settings.flag_index},
            "holdout": None if selection is None else jsonable(selection),
            "certification": None if certification is None else jsonable(certification)}  # fmt: skip


def certification_samples(targets: dict[str, float | None]) -> int:
    """The certification samples ``targets`` need: :data:`~invardiff.certify.P5_SAMPLES` for a
    5th-percentile floor (its lower bound), else any number (0)."""
    return P5_SAMPLES if targets.get("min_psnr_p5") is not None else 0


def calibrate_to_budget(
    pipeline,
    transformer,
    run: Runner,
    calls: list[dict[str, Any]],
    steps: int,
    settings: CalibrationParams,
    *,
    targets: dict[str, float | None],
    holdout: list[dict[str, Any]] | None,
    certification: list[dict[str, Any]] | None,
    measure: Measure | None,
    certify: Measure | None,
    model_id=None,
    revision=None,
    say=lambda message: None,
) -> CachePlan:
    """Phase 1 on ``calls``, then :func:`invardiff.budget.budget_plan` with the selection and
    certification measures (``targets``: its ``target_speedup``/``min_psnr``/``min_psnr_p5``)."""
    speedup = targets.get("target_speedup")
    if speedup is not None and speedup > steps / 2:
        raise ValueError(f"target_speedup {speedup:g} is unreachable: at most {steps / 2:g}x with {steps} steps "
                         "(the first and last step are always computed)")  # fmt: skip
    selection = cert_calls = None
    if measure is None:
        if transformer is pipeline:
            raise ValueError("a bare transformer cannot be measured on held-out calls: pass measure=... and certify=...")
        selection, cert_calls = held_out_sets(calls, holdout, certification, certification_samples(targets))
    phase1 = []
    for i, call in enumerate(calls):
        say(f"phase 1: trajectory {i + 1}/{len(calls)}")
        phase1.append(trajectory_stats(transformer, run, call, i, steps, settings))
    if selection is not None:
        say(f"full-compute references: {len(selection)} selection and {len(cert_calls)} certification call(s)")
        measure, certify = holdout_measure(pipeline, selection), holdout_measure(pipeline, cert_calls)
    template = template_plan(pipeline, calls, phase1, model_id=model_id, revision=revision)
    say(f"searching the plan for {describe_targets(**targets)}")
    return budget_plan(template, merge_scores(phase1), **targets, measure=measure, certify=certify,
                       flag_index=settings.flag_index, provenance=budget_record(calls, settings, selection, cert_calls),
                       say=say)  # fmt: skip
