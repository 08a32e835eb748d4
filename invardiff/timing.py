"""Timing full compute against a plan: interleaved repeats, so machine noise hits both alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .plan import CachePlan


@dataclass(frozen=True)
class FullVsCached:
    """The images of the last repeat and the median seconds of each side."""

    full: np.ndarray
    cached: np.ndarray
    full_s: float
    cached_s: float

    @property
    def speedup(self) -> float:
        return self.full_s / self.cached_s


def time_full_vs_cached(
    pipe: Any, plan: CachePlan, sample: Callable[[int], np.ndarray], repeats: int
) -> FullVsCached:
    """Call ``sample(repeat)`` with full compute, then under ``plan``, ``repeats`` times in turn
    (``sample`` generates with ``pipe``; it synchronises an accelerator itself)."""
    from .runtime import cached

    full_s, cached_s = [], []
    for repeat in range(repeats):
        t0 = time.perf_counter()
        full = sample(repeat)
        t1 = time.perf_counter()
        with cached(pipe, plan):
            fast = sample(repeat)
        t2 = time.perf_counter()
        full_s.append(t1 - t0)
        cached_s.append(t2 - t1)
    return FullVsCached(full, fast, float(np.median(full_s)), float(np.median(cached_s)))
