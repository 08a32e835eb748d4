"""LeMiCa's global formulation of a step budget: the cheapest path through a DAG of jumps.

Nodes are the steps 0 .. T-1; an edge i -> j (i < j) says "compute i and j, reuse every step
between them". Its weight is the measured held-out error of that jump alone: ``10**(-PSNR/10)``
of the plan reusing only steps i+1 .. j-1 (adjacent steps cost 0). A step gate computing c steps
is a path 0 -> T-1 through c nodes; :func:`best_path` finds the one of least total error by
dynamic programming. Jumps are bounded in length (:func:`jump_bound`) so that measuring the
edges stays affordable; the single-step jumps (j = i + 2) are the step-sensitivity profile
(``budget.step_sensitivity``), measured once and reused here. Pure numpy.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from .plan import CachePlan
from .schedules import gate_plan

Measure = Callable[[list[CachePlan]], list[float]]


def jump_bound(steps: int, computed: int) -> int:
    """Shortest jump bound that leaves a path with ``computed`` steps a choice of where to jump:
    ``floor((T-1)/(c-1)) + 1`` (one less forces even jumps, or allows no path at all)."""
    if computed < 2 or computed > steps:
        raise ValueError(f"a path computes 2 .. {steps} steps, got {computed}")
    return min(steps - 1, (steps - 1) // (computed - 1) + 1)


def usable_jumps(steps: int, max_jump: int, counts: tuple[int, ...]) -> list[tuple[int, int]]:
    """Edges ``(i, j)`` with ``3 <= j - i <= max_jump`` that lie on some path 0 -> T-1 with one
    of ``counts`` computed steps and no jump longer than ``max_jump`` (the ones worth measuring;
    length 1 costs nothing, length 2 is the profile)."""
    edges: set[tuple[int, int]] = set()
    for computed in counts:
        ahead = np.zeros((computed, steps), dtype=bool)  # ahead[a, i]: 0 -> i in a jumps
        behind = np.zeros((computed, steps), dtype=bool)  # behind[b, j]: j -> T-1 in b jumps
        ahead[0, 0] = behind[0, steps - 1] = True
        for a in range(1, computed):
            for i in range(steps):
                ahead[a, i] = ahead[a - 1, max(0, i - max_jump) : i].any()
                behind[a, i] = behind[a - 1, i + 1 : i + max_jump + 1].any()
        for i in range(steps):
            for j in range(i + 3, min(i + max_jump, steps - 1) + 1):
                if any(ahead[a, i] and behind[computed - 2 - a, j] for a in range(computed - 1)):
                    edges.add((i, j))
    return sorted(edges, key=lambda edge: (edge[1] - edge[0], edge[0]))


def jump_plans(template: CachePlan, edges: list[tuple[int, int]], rule: str) -> dict[tuple[int, int], CachePlan]:
    """Per edge ``(i, j)``: the plan reusing steps i+1 .. j-1 alone under ``rule``."""
    plans = {}
    for i, j in edges:
        gate = np.zeros(template.steps, dtype=bool)
        gate[i + 1 : j] = True
        plans[(i, j)] = gate_plan(template, gate, step_reuse=rule)
    return plans


def jump_costs(
    template: CachePlan, measure: Measure, sensitivity: np.ndarray, edges: list[tuple[int, int]], rule: str
) -> np.ndarray:
    """Edge weights ``[T x T]`` (inf: no edge): adjacent steps 0, the jumps of length 2 from
    ``sensitivity`` (``budget.step_sensitivity``'s profile, measured under ``rule``), and the
    longer ``edges`` (:func:`usable_jumps`) measured in one ``measure`` call."""
    steps = template.steps
    costs = np.full((steps, steps), np.inf)
    for i in range(steps - 1):
        costs[i, i + 1] = 0.0
    for step in range(1, steps - 1):
        costs[step - 1, step + 1] = float(sensitivity[step])
    plans = jump_plans(template, edges, rule)
    if plans:
        psnr = [float(v) for v in measure(list(plans.values()))]
        if len(psnr) != len(plans):
            raise ValueError(f"measure returned {len(psnr)} values for {len(plans)} plans")
        for (i, j), value in zip(plans, psnr):
            costs[i, j] = 10.0 ** (-value / 10.0)  # inf dB (nothing changed) -> 0
    return costs


def best_path(costs: np.ndarray, computed: int) -> np.ndarray | None:
    """Step gate (True = reuse) of the least-cost path 0 -> T-1 through exactly ``computed``
    steps, ties to the earliest predecessor; ``None`` when no such path has finite cost.

    ``best[c, j]`` = least cost of a path from 0 to j through c + 1 steps; O(c T^2).
    """
    costs = np.asarray(costs, dtype=np.float64)
    steps = costs.shape[0]
    if costs.shape != (steps, steps) or not 2 <= computed <= steps:
        raise ValueError(f"need square costs and 2 <= computed <= {steps}, got {costs.shape} and {computed}")
    forward = np.triu(costs, k=1) + np.tril(np.full((steps, steps), np.inf))  # only edges i < j
    best = np.full((computed, steps), np.inf)
    back = np.zeros((computed, steps), dtype=int)
    best[0, 0] = 0.0
    for c in range(1, computed):
        totals = best[c - 1][:, None] + forward  # [i, j]: reach i with c nodes, then jump to j
        back[c] = np.argmin(totals, axis=0)
        best[c] = totals[back[c], np.arange(steps)]
    if not np.isfinite(best[computed - 1, steps - 1]):
        return None
    gate = np.ones(steps, dtype=bool)
    node = steps - 1
    for c in range(computed - 1, -1, -1):
        gate[node] = False
        node = back[c, node]
    return gate


def path_cost(costs: np.ndarray, gate: np.ndarray) -> float:
    """Total edge weight of the path a step gate takes (its computed steps in order)."""
    nodes = np.flatnonzero(~np.asarray(gate, dtype=bool))
    return float(sum(costs[i, j] for i, j in itertools.pairwise(nodes)))
