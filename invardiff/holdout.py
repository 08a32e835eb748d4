"""Held-out calls of a budget search: three disjoint seed sets and the per-sample measure.

A budget calibration uses three sets of calls whose seeds are pairwise disjoint: calibration
(phase-1 statistics), selection (ranks the candidates) and certification (the returned plan's
figures). :func:`held_out_sets` derives the defaults (the calibration calls with fresh seeds,
past every seed already used, whatever those are) and checks every seed of every set.
``holdout_measure(pipeline, calls)`` runs every call once at full compute, then returns
``measure(plans, done)``: per plan, the PSNR (dB, :func:`invardiff.metrics.psnr`) of every
sample (each image of a call's batch) against those.
"""

from __future__ import annotations

import inspect
from itertools import combinations
from typing import Any

import numpy as np
import torch

from .certify import Done, Measure
from .metrics import psnr
from .plan import CachePlan

Calls = list[dict[str, Any]]


def fresh_calls(calls: Calls, used: Calls) -> Calls:
    """``calls`` with fresh seeds: consecutive from one past the largest seed in ``used``."""
    start = max(int(call["seed"]) for call in used) + 1
    return [{**call, "seed": start + i} for i, call in enumerate(calls)]


def check_disjoint(**sets: Calls) -> None:
    """Refuse an empty set, a call without a seed, and any seed two of the named sets share."""
    for name, calls in sets.items():
        if not calls:
            raise ValueError(f"the {name} set needs at least one call")
        if any("seed" not in call for call in calls):
            raise ValueError(f"every {name} call needs a 'seed'")
    for (first, a), (second, b) in combinations(sets.items(), 2):
        shared = {int(c["seed"]) for c in a} & {int(c["seed"]) for c in b}
        if shared:
            raise ValueError(f"{second} calls reuse {first} seed(s) {sorted(shared)[:8]}: each set needs fresh seeds")


def held_out_sets(calls: Calls, selection: Calls | None = None, certification: Calls | None = None) -> tuple[Calls, Calls]:
    """The selection and certification calls of a calibration on ``calls`` (defaults: ``calls``
    with fresh seeds each), checked pairwise disjoint with the calibration calls."""
    check_disjoint(calibration=calls)
    selection = fresh_calls(calls, calls) if selection is None else selection
    if certification is None:
        certification = fresh_calls(calls, [*calls, *selection])
    check_disjoint(calibration=calls, selection=selection, certification=certification)
    return selection, certification


def holdout_measure(pipeline, calls: Calls) -> Measure:
    """``measure(plans, done) -> [per-sample PSNR dB]`` on ``calls`` (each with a ``seed``).

    Outputs are images in [0, 1] (``output_type="np"``, data range 1; one sample per image)
    when the pipeline takes ``output_type``, else its raw output (one sample per call, data
    range: the reference's peak to peak).
    """
    from .runtime import cached

    images = "output_type" in inspect.signature(pipeline.__call__).parameters

    def run(call: dict[str, Any]) -> np.ndarray:
        kwargs = {k: v for k, v in call.items() if k != "seed"}
        if images:
            kwargs.setdefault("output_type", "np")
        with torch.no_grad():
            result = pipeline(**kwargs, generator=torch.Generator().manual_seed(int(call["seed"])))
        result = getattr(result, "images", result)
        result = result[0] if isinstance(result, tuple) else result
        result = result.float().cpu().numpy() if isinstance(result, torch.Tensor) else np.asarray(result)
        return result if images else result.reshape(1, -1, 1, 1)  # raw: the whole output is one sample

    references = [run(call) for call in calls]
    ranges = [1.0 if images else float(np.ptp(r)) or 1.0 for r in references]

    def measure(plans: list[CachePlan], done: Done) -> list[list[float]]:
        values = []
        for plan in plans:
            with cached(pipeline, plan):
                outputs = [run(call) for call in calls]
            values.append([float(v) for o, r, d in zip(outputs, references, ranges) for v in psnr(o, r, d, "none")])
            done()
        return values

    return measure
