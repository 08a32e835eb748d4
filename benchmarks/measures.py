"""Held-out measures shared by the budget searches of one benchmark run."""

from __future__ import annotations

from invardiff.certify import Done, Measure, Samples
from invardiff.plan import CachePlan


class RecordingMeasure:
    """A held-out measure that records each call's plans and figures; a plan measured before
    (e.g. the step profile at the next target) is answered from memory (the same figures:
    measurements are deterministic), but the search still counts it."""

    def __init__(self, measure: Measure):
        self.measure = measure
        self.memory: dict[str, Samples] = {}
        self.calls: list[tuple[list[CachePlan], list[Samples]]] = []

    def __call__(self, plans: list[CachePlan], done: Done) -> list[Samples]:
        fresh = [p for p in dict.fromkeys(p.sha256 for p in plans) if p not in self.memory]
        if fresh:
            by_sha = {p.sha256: p for p in plans}
            self.memory.update(zip(fresh, self.measure([by_sha[s] for s in fresh], lambda: None)))
        values = [self.memory[p.sha256] for p in plans]
        for _ in plans:
            done()
        self.calls.append((plans, values))
        return values
