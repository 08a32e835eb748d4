"""The measurements of a budget search: fidelity figures, selection and certification, progress.

A :data:`Measure` runs plans on one held-out set and returns, per plan, the PSNR (dB) of every
sample against full compute; it calls ``done()`` once per finished plan (any order). The search
ranks candidates with one measure (the *selection* set) and certifies the plan it returns with
another (the *certification* set, seeds neither calibration nor selection used), so the
certified figures are not chosen on the samples that measure them (docs/certification.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .plan import CachePlan

Done = Callable[[], None]
Samples = Sequence[float] | float  # per-sample PSNR dB; a float is a single figure (one sample)
Measure = Callable[[list[CachePlan], Done], list[Samples]]
PERCENTILE = 5.0  # the low percentile a plan certifies ("p5")
CONFIDENCE = 0.9  # of the certified 5th percentile's lower bound (p5_bound)
STAGES = {"profile": "step profile", "jumps": "LeMiCa jumps", "candidates": "candidates",
          "certification": "certification"}


def _rounded(value: float) -> float | None:
    return round(value, 3) if math.isfinite(value) else None  # JSON: None is infinite (identical)


def bound_rank(samples: int, quantile: float = PERCENTILE / 100, confidence: float = CONFIDENCE) -> int:
    """The largest rank r (1: the smallest sample) whose order statistic is a lower bound of the
    ``quantile`` with probability at least ``confidence``, whatever the (continuous) distribution:
    P(Binomial(samples, quantile) >= r) >= confidence. 0: no rank is (too few samples)."""
    below = 1.0  # P(Binomial >= r), from r = 0 upwards
    for r in range(samples + 1):
        if below < confidence:
            return r - 1
        below -= math.comb(samples, r) * quantile**r * (1 - quantile) ** (samples - r)
    return samples


def samples_for_bound(quantile: float = PERCENTILE / 100, confidence: float = CONFIDENCE) -> int:
    """The fewest samples whose smallest one bounds the ``quantile`` at ``confidence`` (45 for
    the 5th percentile at 90%)."""
    return math.ceil(math.log(1 - confidence) / math.log(1 - quantile))


P5_SAMPLES = samples_for_bound()  # certification samples a min_psnr_p5 promise needs


@dataclass(frozen=True)
class Fidelity:
    """Mean and 5th percentile PSNR (dB) over ``samples`` samples (``inf``: identical outputs),
    and ``p5_bound``: a lower bound of the 5th percentile at :data:`CONFIDENCE` (an order
    statistic, :func:`bound_rank`; ``None`` below :data:`P5_SAMPLES` samples)."""

    mean: float
    p5: float
    samples: int
    p5_bound: float | None = None

    @classmethod
    def of(cls, values: Samples) -> Fidelity:
        """The figures of per-sample PSNRs; the percentile is an observed sample (numpy's
        ``"lower"`` method: never interpolated, so infinite samples stay well defined)."""
        v = np.atleast_1d(np.asarray(values, dtype=np.float64)).reshape(-1)
        if v.size == 0 or np.isnan(v).any():
            raise ValueError(f"a measure returned no or NaN PSNR samples: {values!r}")
        rank = bound_rank(v.size)
        bound = float(np.sort(v)[rank - 1]) if rank else None
        return cls(float(np.mean(v)), float(np.percentile(v, PERCENTILE, method="lower")), int(v.size), bound)

    def to_json(self) -> dict:
        bound = None if self.p5_bound is None else _rounded(self.p5_bound)
        return {"psnr_mean": _rounded(self.mean), "psnr_p5": _rounded(self.p5), "samples": self.samples,
                "psnr_p5_bound": bound}  # fmt: skip


@dataclass(frozen=True)
class Floors:
    """A fidelity target: a floor on the mean and/or on the 5th percentile (dB)."""

    min_psnr: float | None = None
    min_psnr_p5: float | None = None

    def met_by(self, fidelity: Fidelity) -> bool:
        """On the selection set: the observed mean and 5th percentile."""
        return (self.min_psnr is None or fidelity.mean >= self.min_psnr) and (
            self.min_psnr_p5 is None or fidelity.p5 >= self.min_psnr_p5
        )

    def certified_by(self, fidelity: Fidelity) -> bool:
        """On the certification set: the mean, and the 5th percentile's lower bound (refused
        when the set has too few samples to give one)."""
        if self.min_psnr_p5 is not None and fidelity.p5_bound is None:
            raise ValueError(f"a min_psnr_p5 promise needs at least {P5_SAMPLES} certification samples "
                             f"(a {CONFIDENCE:.0%} lower bound of the 5th percentile); the certification gave "
                             f"{fidelity.samples}")  # fmt: skip
        return (self.min_psnr is None or fidelity.mean >= self.min_psnr) and (
            self.min_psnr_p5 is None or fidelity.p5_bound >= self.min_psnr_p5
        )

    def rank(self, fidelity: Fidelity) -> float:
        """The figure candidates are ranked by: the percentile when only it is constrained."""
        return fidelity.p5 if self.min_psnr is None else fidelity.mean


class Search:
    """The measurements of one budget search: ``select`` ranks candidates (and measures the
    step profile), ``certify`` gives the returned plan's figures. Counts the plans measured per
    stage and says, per measured plan, the stage, k of n, the elapsed time and an ETA."""

    def __init__(self, select: Measure, certify: Measure | None = None, say: Callable[[str], None] | None = None):
        self.select, self.certify = select, certify
        self.say = say or (lambda message: None)
        self.counts = dict.fromkeys(STAGES, 0)

    def measure(self, stage: str, plans: list[CachePlan]) -> list[Fidelity]:
        """``plans`` measured for ``stage`` (a key of :data:`STAGES`) on its set."""
        if stage == "certification" and self.certify is None:
            raise ValueError("certification needs a certify measure")
        measure = self.certify if stage == "certification" else self.select
        total, finished, started = len(plans), [0], time.perf_counter()

        def done() -> None:
            finished[0] += 1
            k, elapsed = finished[0], time.perf_counter() - started
            eta = elapsed / k * (total - k)
            self.say(f"{STAGES[stage]}: plan {k}/{total} measured, {elapsed:.1f} s elapsed, ETA {eta:.0f} s")

        values = measure(plans, done)
        if len(values) != total:
            raise ValueError(f"measure returned {len(values)} values for {total} plans")
        self.counts[stage] += total
        return [Fidelity.of(v) for v in values]

    def certified(self, plan: CachePlan) -> Fidelity:
        """The certification figures of one plan."""
        return self.measure("certification", [plan])[0]
