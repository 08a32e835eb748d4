"""The module axis under a FLOP budget: compute more steps, reuse single modules on them.

A step-only budget plan computes n steps. A module-axis candidate computes n + e steps (evenly
spaced) and, on those computed steps, reuses (or, under a forecasting module rule, predicts)
individual attention / MLP outputs per layer until the FLOPs that actually run fit the budget
again: ``plan.summary().ideal_speedup >= target_speedup`` (i.e. ``executed_fraction <=
1/target_speedup``). Modules are taken lowest phase-1 change score first (the merged ``[T x L]``
score per kind), never on the first or last step. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .plan import CachePlan
from .schedules import gate_plan, spaced_gate

MODULE_RULES = ("hold", "linear")  # each candidate under each rule (plan.with_module_reuse; "Round 2")
EXTRA_STEPS = (1, 2, 3)  # trade-off points: "modules+1", "modules+2", "modules+3"

# Kinds flagged together: a FLUX joint attention saves FLOPs only when both halves are reused.
UNITS = {
    "dit": (("attn",), ("mlp",)),
    "flux": (("attn", "context_attn"), ("ff",), ("context_ff",), ("single_attn",), ("single_mlp",)),
}

Unit = tuple[int, int, int]  # (step, unit index in UNITS[arch], layer)


def admissible(plan: CachePlan, target_speedup: float) -> bool:
    """Does the plan's ideal speed-up (FLOPs that actually run) meet the target?"""
    return plan.summary().ideal_speedup >= target_speedup


def ranked_units(plan: CachePlan, scores: Mapping[str, np.ndarray]) -> list[Unit]:
    """Module units on the plan's computed steps (not the first or last step), lowest change
    score first (a joint unit scores its highest kind); ties by step, unit, layer."""
    units = UNITS[plan.arch]
    computed = np.flatnonzero(~plan.step_gate)
    inner = [int(s) for s in computed if 0 < s < plan.steps - 1]
    ranked = []
    for u, kinds in enumerate(units):
        score = np.max([np.asarray(scores[kind], dtype=np.float64) for kind in kinds], axis=0)
        for step in inner:
            for layer in range(score.shape[1]):
                ranked.append((float(score[step, layer]), step, u, layer))
    ranked.sort()
    return [(step, u, layer) for _, step, u, layer in ranked]


def reuse_units(plan: CachePlan, chosen: list[Unit]) -> CachePlan:
    """A copy of ``plan`` that also reuses the given module units."""
    modules = {kind: flags.copy() for kind, flags in plan.modules.items()}
    for step, u, layer in chosen:
        for kind in UNITS[plan.arch][u]:
            modules[kind][step, layer] = True
    return plan.with_flags(plan.step_gate, modules)


def fill_budget(plan: CachePlan, scores: Mapping[str, np.ndarray], target_speedup: float) -> CachePlan | None:
    """``plan`` reusing the fewest lowest-scoring module units that make it admissible
    (binary search on their number); ``None`` when even all of them do not."""
    ranked = ranked_units(plan, scores)
    if not admissible(reuse_units(plan, ranked), target_speedup):
        return None
    low, high = 0, len(ranked)  # invariant: the first `high` units are admissible
    while low < high:
        mid = (low + high) // 2
        if admissible(reuse_units(plan, ranked[:mid]), target_speedup):
            high = mid
        else:
            low = mid + 1
    return reuse_units(plan, ranked[:high])


def module_candidates(
    template: CachePlan,
    scores: Mapping[str, np.ndarray],
    target_speedup: float,
    computed: int,
    step_rules: tuple[str, ...],
    module_rules: tuple[str, ...] | None = None,
    extra_steps: tuple[int, ...] = EXTRA_STEPS,
) -> dict[str, CachePlan]:
    """Named admissible candidates ``modules+e[+step rule][+module-rule]``: ``computed + e``
    evenly spaced steps, module units reused on them until ``target_speedup`` is met, under
    each of ``module_rules`` (default: :data:`MODULE_RULES`)."""
    candidates = {}
    for extra in extra_steps:
        if computed + extra > template.steps:
            break
        gate = spaced_gate(template.steps, computed + extra)
        for step_rule in step_rules:
            plan = fill_budget(gate_plan(template, gate, step_reuse=step_rule), scores, target_speedup)
            if plan is None:
                continue
            for module_rule in module_rules or MODULE_RULES:
                name = f"modules+{extra}" + ("" if step_rule == "hold" else f"+{step_rule}")
                if module_rule == "hold":
                    candidates[name] = plan
                else:
                    candidates[f"{name}+module-{module_rule}"] = plan.with_module_reuse(module_rule)
    return candidates
