"""Fidelity of plans on held-out calls: the ``measure`` callback of the budget search.

``holdout_measure(pipeline, calls)`` runs every held-out call once at full compute, then
returns ``measure(plans)``: per plan, the mean PSNR (dB) of its outputs against those.
Held-out calls must not reuse a calibration seed (``holdout_calls`` derives fresh ones).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from .budget import Measure
from .plan import CachePlan

HOLDOUT_SEED_OFFSET = 1_000_003


def holdout_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The calibration calls with seeds shifted by ``HOLDOUT_SEED_OFFSET`` (never reused)."""
    return [{**call, "seed": int(call["seed"]) + HOLDOUT_SEED_OFFSET} for call in calls]


def check_disjoint(calibration: list[dict[str, Any]], holdout: list[dict[str, Any]]) -> None:
    """Refuse held-out calls that repeat a calibration seed."""
    if not holdout:
        raise ValueError("fidelity needs at least one held-out call")
    if any("seed" not in call for call in holdout):
        raise ValueError("every held-out call needs a 'seed'")
    shared = {int(c["seed"]) for c in calibration} & {int(c["seed"]) for c in holdout}
    if shared:
        raise ValueError(f"held-out calls reuse calibration seed(s) {sorted(shared)}: fidelity must be measured on fresh seeds")


def psnr(output: np.ndarray, reference: np.ndarray, data_range: float) -> float:
    """PSNR in dB of one output against its full-compute reference (inf when identical)."""
    mse = float(np.mean((np.asarray(output, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return float("inf") if mse == 0.0 else 10.0 * np.log10(data_range**2 / mse)


def holdout_measure(pipeline, calls: list[dict[str, Any]]) -> Measure:
    """``measure(plans) -> [mean PSNR dB]`` on ``calls`` (each with a ``seed``) for a pipeline.

    Outputs are images in [0, 1] (``output_type="np"``, data range 1) when the pipeline
    takes ``output_type``, else its raw output (data range: the reference's peak to peak).
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
        return result.float().cpu().numpy() if isinstance(result, torch.Tensor) else np.asarray(result)

    references = [run(call) for call in calls]
    ranges = [1.0 if images else float(np.ptp(r)) or 1.0 for r in references]

    def measure(plans: list[CachePlan]) -> list[float]:
        values = []
        for plan in plans:
            with cached(pipeline, plan):
                outputs = [run(call) for call in calls]
            values.append(float(np.mean([psnr(o, r, d) for o, r, d in zip(outputs, references, ranges)])))
        return values

    return measure
