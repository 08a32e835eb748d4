"""Budget-targeted plans: the most faithful schedule for a speed-up, the fastest for a fidelity.

Pure functions over merged phase-1 statistics (numpy only). A budget fixes how many steps are
computed; candidates place them differently (evenly spaced, the every-k schedule, denser late
or early, and a dynamic program over the drift the statistics record or over a measured step
sensitivity profile), and a caller-supplied measure on the selection set picks among them; a
second measure on a disjoint certification set gives the returned plan's figures and decides
the fidelity targets (:mod:`invardiff.certify`, docs/certification.md). The profile (:func:`step_sensitivity`) is the held-out error of reusing each
single step, measured once per search. Every placement is measured with both step-reuse rules
(hold the last computed hidden state, or extrapolate it linearly: docs/step-reuse.md). Even
spacing with held steps (every-k's rule) is always a candidate, so a measured choice never
does worse than it (docs/plan-quality.md). Two more families join a speed-up search: LeMiCa's
best path through measured jump errors (:mod:`invardiff.paths`) and the module axis (more
computed steps, fewer modules: :mod:`invardiff.module_axis`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from .certify import Fidelity, Floors, Measure, Search
from .module_axis import module_candidates
from .paths import best_path, jump_bound, jump_costs, usable_jumps
from .plan import CachePlan
from .schedules import every_k_gate, gate_plan, spaced_gate

WARPS = {"denser-late": 0.9, "denser-early": 1.15}  # exponent of the spacing warp u -> u**g
DRIFT_POWERS = (0.5, 1.0)  # candidates "drift-0.5", "drift-1": error ~ accumulated drift**p
SENSITIVITY_POWERS = (0.5, 1.0)  # candidates "sensitivity-0.5", "sensitivity-1" (measured profile)
PROFILE_RULE = "linear"  # the step-reuse rule the sensitivity profile is measured under
STEP_RULES = ("hold", "linear")  # each gate is a candidate under each rule ("even", "even+linear")


def check_targets(
    target_speedup: float | None, min_psnr: float | None, min_psnr_p5: float | None = None
) -> None:
    """Raise ValueError unless exactly one well-formed target is given: a speed-up, or a
    fidelity floor on the certified mean (``min_psnr``) and/or 5th percentile (``min_psnr_p5``)."""
    floors = {"min_psnr": min_psnr, "min_psnr_p5": min_psnr_p5}
    if (target_speedup is None) == all(v is None for v in floors.values()):
        raise ValueError("give exactly one target: target_speedup, or min_psnr and/or min_psnr_p5")
    if target_speedup is not None and not (math.isfinite(target_speedup) and target_speedup >= 1.0):
        raise ValueError(f"target_speedup must be a finite number >= 1, got {target_speedup}")
    for name, value in floors.items():
        if value is not None and not (math.isfinite(value) and value > 0.0):
            raise ValueError(f"{name} must be a positive number of dB, got {value}")


def describe_targets(
    target_speedup: float | None = None, min_psnr: float | None = None, min_psnr_p5: float | None = None
) -> str:
    """The target in words (for progress lines)."""
    if target_speedup is not None:
        return f"an ideal speed-up of at least {target_speedup:g}x"
    floors = [f"{what} of at least {value:g} dB" for what, value in
              (("a certified mean PSNR", min_psnr), ("a certified 5th-percentile PSNR", min_psnr_p5)) if value is not None]  # fmt: skip
    return " and ".join(floors)


def drift_from_ratios(ratios: np.ndarray, flag_index: str = "reference") -> np.ndarray:
    """Per-step displacement of H, ``D[i] ~ |H[i] - H[i-1]|``, up to scale, from the merged
    phase-1 change ratios of H (``r = D[i+1]/D[i]`` at i, or ``D[i]/D[i-1]`` when aligned).

    ``D[0]`` (no previous step) is set to ``D[1]``.
    """
    r = np.asarray(ratios, dtype=np.float64).reshape(-1)
    steps = r.shape[0]
    log_drift = np.zeros(steps)
    for i in range(2, steps):
        ratio = r[i - 1] if flag_index == "reference" else r[i]
        log_drift[i] = log_drift[i - 1] + math.log(max(ratio, 1e-12))
    log_drift[0] = log_drift[1]
    drift = np.exp(log_drift - log_drift.max())
    return drift


def drift_gate(weights: np.ndarray, computed: int) -> np.ndarray:
    """Step gate computing ``computed`` steps (the first and last among them) that minimises
    the error accumulated along runs: a reused step i after computed step j costs
    ``sum(weights[j+1..i])``. Constant weights give even spacing. Dynamic program, O(n T^2).
    """
    w = np.asarray(weights, dtype=np.float64)
    steps = w.shape[0]
    computed = min(max(int(computed), 2), steps)
    prefix = np.concatenate([[0.0], np.cumsum(w)])  # prefix[i] = sum(w[:i])
    cum = np.concatenate([[0.0], np.cumsum(prefix[1:])])  # cum[i] = sum(prefix[1..i])

    def segment(j: int, k: int) -> float:  # runs j+1..k-1 reuse the output of step j
        inner = k - 1 - j
        return (cum[k] - cum[j + 1]) - inner * prefix[j + 1] if inner > 0 else 0.0

    costs = np.array([[segment(j, k) if k > j else np.inf for k in range(steps)] for j in range(steps)])
    return best_path(costs, computed)  # the run costs are the edges of a path 0 -> T-1


def single_step_plans(template: CachePlan, rule: str = PROFILE_RULE) -> list[CachePlan]:
    """One plan per inner step ``1 .. T-2`` reusing that step alone under ``rule``."""
    plans = []
    for step in range(1, template.steps - 1):
        gate = np.zeros(template.steps, dtype=bool)
        gate[step] = True
        plans.append(gate_plan(template, gate, step_reuse=rule))
    return plans


def step_sensitivity(template: CachePlan, search: Search) -> np.ndarray:
    """Measured cost of reusing each step: ``10**(-PSNR/10)`` (the mean squared error of
    images in [0, 1]) of the plan reusing that step alone, every other step computed, under
    :data:`PROFILE_RULE`, on the selection set. The first and last step, never reused, get the
    largest cost.

    ``T - 2`` measured plans; the weights of :func:`drift_gate` for the "sensitivity" candidates.
    """
    plans = single_step_plans(template)
    if not plans:
        return np.ones(template.steps)
    psnr = np.asarray([f.mean for f in search.measure("profile", plans)], dtype=np.float64)
    cost = np.power(10.0, -psnr / 10.0)  # inf dB (no change at all) -> 0
    return np.concatenate([[cost.max()], cost, [cost.max()]])


def warped_gate(steps: int, computed: int, power: float) -> np.ndarray:
    """Computed steps at ``round((T-1) * u**power)`` for u evenly spaced in [0, 1]
    (power < 1: denser late, > 1: denser early); duplicates fall back to even spacing."""
    u = np.linspace(0.0, 1.0, computed)
    positions = np.unique(np.round((steps - 1) * u**power).astype(int))
    if len(positions) != computed:
        return spaced_gate(steps, computed)
    gate = np.ones(steps, dtype=bool)
    gate[positions] = False
    return gate


def candidate_gates(
    steps: int,
    computed: int,
    drift: np.ndarray | None = None,
    sensitivity: np.ndarray | None = None,
    jumps: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Named step gates with exactly ``computed`` computed steps, duplicates removed.

    Always holds ``"even"``; ``"every-k"`` when that schedule computes as many steps;
    ``"drift-p"`` and ``"sensitivity-p"`` when those per-step weights are given; ``"lemica"``
    (the best path through the measured jump costs ``jumps``, :mod:`invardiff.paths`) when
    one with ``computed`` steps exists.
    """
    gates = {"even": spaced_gate(steps, computed)}
    if computed >= 3:  # even spacing over all but the last step, which is computed too (every-k's tail)
        gates["even+last"] = np.append(spaced_gate(steps - 1, computed - 1), False)
    for k in range(2, steps):
        if int((~every_k_gate(steps, k)).sum()) == computed:
            gates[f"every-{k}"] = every_k_gate(steps, k)
    for name, power in WARPS.items():
        gates[name] = warped_gate(steps, computed, power)
    if drift is not None:
        for power in DRIFT_POWERS:
            gates[f"drift-{power:g}"] = drift_gate(np.asarray(drift) ** power, computed)
    if sensitivity is not None:
        for power in SENSITIVITY_POWERS:
            gates[f"sensitivity-{power:g}"] = drift_gate(np.asarray(sensitivity) ** power, computed)
    path = None if jumps is None else best_path(jumps, computed)
    if path is not None:
        gates["lemica"] = path
    unique: dict[str, np.ndarray] = {}
    for name, gate in gates.items():
        if not any(np.array_equal(gate, seen) for seen in unique.values()):
            unique[name] = gate
    return unique


def ideal_speedup(template: CachePlan, computed: int) -> float:
    """Ideal speed-up of a whole-step schedule computing ``computed`` steps."""
    return gate_plan(template, spaced_gate(template.steps, computed)).summary().ideal_speedup


def computed_for_speedup(template: CachePlan, target_speedup: float) -> int:
    """Most computed steps whose ideal speed-up is still at least ``target_speedup``."""
    steps = template.steps
    fastest = ideal_speedup(template, 2)
    if target_speedup > fastest:
        raise ValueError(
            f"target_speedup {target_speedup:g} is unreachable: at most {fastest:.2f}x with {steps} steps "
            "(only the first and last step computed)"
        )
    return max(n for n in range(2, steps + 1) if ideal_speedup(template, n) >= target_speedup)


def candidate_plans(template: CachePlan, gates: dict[str, np.ndarray]) -> dict[str, CachePlan]:
    """Every gate under every step-reuse rule: ``name`` (hold) and ``name+linear``."""
    return {
        name if rule == "hold" else f"{name}+{rule}": gate_plan(template, gate, step_reuse=rule)
        for name, gate in gates.items()
        for rule in STEP_RULES
    }


def _select(
    template: CachePlan,
    gates: dict[str, np.ndarray],
    search: Search,
    rank=lambda f: f.mean,
    families: dict[str, CachePlan] | None = None,
) -> tuple[dict[str, CachePlan], dict[str, Fidelity], list[str]]:
    """Every candidate plan of ``gates`` (and the further named plans of ``families``: the
    module axis) measured on the selection set; names best first by ``rank`` (ties: the first
    candidate)."""
    plans = {**candidate_plans(template, gates), **(families or {})}
    scores = dict(zip(plans, search.measure("candidates", list(plans.values()))))
    order = sorted(plans, key=lambda n: -rank(scores[n]))  # stable: ties keep candidate order
    return plans, scores, order


def _record(provenance: dict, name: str, scores: dict[str, Fidelity], search: Search, **figures) -> dict:
    """The budget provenance of a chosen candidate: every candidate's selection mean, the chosen
    one's selection and certification figures, and the plans measured per stage."""
    recorded = {n: f.to_json()["psnr_mean"] for n, f in scores.items()}
    record = {**provenance, "mode": "budget", "candidate": name, "candidates_psnr": recorded}
    if name in scores:
        record["selected"] = scores[name].to_json()
    record.update({k: v.to_json() if isinstance(v, Fidelity) else v for k, v in figures.items()})
    return {**record, "measured": dict(search.counts)}


def budget_plan(
    template: CachePlan,
    phase1: dict | None = None,
    *,
    target_speedup: float | None = None,
    min_psnr: float | None = None,
    min_psnr_p5: float | None = None,
    measure: Measure | None = None,
    certify: Measure | None = None,
    flag_index: str = "reference",
    provenance: dict | None = None,
    say: Callable[[str], None] | None = None,
) -> CachePlan:
    """The fleet's entry point: a budget-targeted plan from merged phase-1 statistics.

    ``phase1`` is ``merge_scores(phase-1 stats)`` (its ``"hidden"`` ratios give the drift
    candidates; ``None`` leaves them out). The target is ``target_speedup`` (most faithful plan
    with at least that ideal speed-up) or a fidelity floor, ``min_psnr`` (certified mean)
    and/or ``min_psnr_p5`` (certified 5th percentile): the fastest plan certified to keep it.
    ``measure`` ranks candidates on the selection set, ``certify`` measures the returned plan
    on the certification set (disjoint from it: :mod:`invardiff.certify`); a floor needs both.
    With a ``measure``, the step sensitivity profile is measured first (``T - 2`` plans) and
    recorded as ``step_psnr``. ``say`` receives a progress line per measured plan.
    """
    check_targets(target_speedup, min_psnr, min_psnr_p5)
    if target_speedup is None and (measure is None or certify is None):
        raise ValueError("min_psnr and min_psnr_p5 need measure and certify: fidelity is measured on held-out seeds")
    if certify is not None and measure is None:
        raise ValueError("certify needs a selection measure too")
    drift = None if phase1 is None else drift_from_ratios(np.asarray(phase1["hidden"]), flag_index)
    sensitivity, search = None, None
    provenance = dict(provenance or {})
    if measure is not None:
        search = Search(measure, certify, say)
        sensitivity = step_sensitivity(template, search)
        provenance["step_psnr"] = _profile_record(sensitivity)
    if target_speedup is not None:
        return plan_for_speedup(template, target_speedup, drift, search, provenance, sensitivity, phase1)
    return plan_for_psnr(template, Floors(min_psnr, min_psnr_p5), search, drift, provenance, sensitivity, phase1)


def _profile_record(sensitivity: np.ndarray) -> list[float | None]:
    """The profile as PSNR dB per inner step (JSON: None where reuse changed nothing)."""
    inner = sensitivity[1:-1]
    return [round(float(-10.0 * np.log10(c)), 2) if c > 0 else None for c in inner]


def new_families(
    template: CachePlan,
    counts: tuple[int, ...],
    target_speedup: float,
    search: Search,
    drift: np.ndarray | None,
    sensitivity: np.ndarray | None,
    module_scores: dict | None,
    jumps: np.ndarray | None = None,
) -> tuple[dict[str, CachePlan], np.ndarray | None, dict]:
    """The module axis (``module_scores`` given) and LeMiCa's jump costs (``sensitivity``
    given) for a budget computing ``counts[0]`` steps (candidates at ``counts``).

    Returns the module candidates, the jump costs (``jumps`` with the usable jumps it lacked
    measured; ``None`` when measuring them would more than double the search: the profile and
    the step-only candidates at ``counts``) and what to record of LeMiCa."""
    computed = counts[0]
    families = {}
    if module_scores is not None:
        families = module_candidates(template, module_scores, target_speedup, computed, (PROFILE_RULE,))
    if sensitivity is None or computed >= template.steps:
        return families, jumps, {}
    today = template.steps - 2 + len(STEP_RULES) * sum(len(candidate_gates(template.steps, n, drift, sensitivity))
                                                       for n in counts)  # fmt: skip
    bound = jump_bound(template.steps, computed)
    edges = usable_jumps(template.steps, bound, counts)
    if len(edges) + len(STEP_RULES) * len(counts) + len(families) > today:  # the search at most doubles
        return families, jumps, {}
    fresh = [edge for edge in edges if jumps is None or not np.isfinite(jumps[edge])]
    costs = jump_costs(template, lambda plans: [f.mean for f in search.measure("jumps", plans)], sensitivity, fresh,
                       PROFILE_RULE)  # fmt: skip
    if jumps is not None:
        costs = np.where(np.isfinite(jumps), jumps, costs)
    return families, costs, {"lemica_max_jump": bound, "lemica_jumps_measured": len(edges)}


def plan_for_speedup(
    template: CachePlan,
    target_speedup: float,
    drift: np.ndarray | None = None,
    search: Search | None = None,
    provenance: dict | None = None,
    sensitivity: np.ndarray | None = None,
    module_scores: dict | None = None,
) -> CachePlan:
    """The most faithful plan whose ideal speed-up is at least ``target_speedup``.

    ``template`` supplies model, target and geometry; ``drift`` (``drift_from_ratios``) and
    ``sensitivity`` (``step_sensitivity``) add candidates placed by those weights; ``search``
    ranks candidates on the selection set and certifies the best when it has a certify measure
    (without a search the evenly spaced schedule is returned). Candidates compute the most
    steps the budget allows, n, and, with a search, n - 1 (named ``name@n-1``): a faster plan
    that measures better is the better answer, so a higher target never yields a more faithful
    plan than a lower one.

    Two more families with a search (:func:`new_families`): ``"lemica"``, the best path
    through measured jump costs (:mod:`invardiff.paths`, jumps up to the bound the budget
    needs, left out when measuring them would more than double the search), and, given the
    phase-1 ``module_scores``, the module axis (:mod:`invardiff.module_axis`: more computed
    steps, fewer modules, the same FLOP budget) under :data:`PROFILE_RULE`.
    """
    check_targets(target_speedup, None)
    computed = computed_for_speedup(template, target_speedup)
    provenance = {**(provenance or {}), "target_speedup": float(target_speedup)}
    if search is None:
        gates = candidate_gates(template.steps, computed, drift, sensitivity)
        plan = candidate_plans(template, {"even": gates["even"]})["even"]
        return replace(plan, calibration={**provenance, "mode": "budget", "candidate": "even", "candidates_psnr": {}})
    counts = (computed, computed - 1) if computed > 2 else (computed,)
    families, jumps, lemica = new_families(template, counts, target_speedup, search, drift, sensitivity, module_scores)
    provenance.update(lemica)
    gates = {}
    for n in counts:
        suffix = "" if n == computed else f"@{n}"
        gates.update({name + suffix: gate for name, gate in candidate_gates(template.steps, n, drift, sensitivity,
                                                                            jumps).items()})  # fmt: skip
    plans, scores, order = _select(template, gates, search, families=families)
    plan = plans[order[0]]
    figures = {"certified": search.certified(plan)} if search.certify is not None else {}
    return replace(plan, calibration=_record(provenance, order[0], scores, search, **figures))


def plan_for_psnr(
    template: CachePlan, floors: Floors, search: Search, drift: np.ndarray | None = None,
    provenance: dict | None = None, sensitivity: np.ndarray | None = None, module_scores: dict | None = None,
) -> CachePlan:  # fmt: skip
    """The fastest plan certified to meet ``floors``.

    Binary search on the number of computed steps with the evenly spaced schedule and, given
    ``sensitivity``, the profile's placement (each under every step-reuse rule), measured on
    the selection set. Then, from one step fewer than the count found upwards: all candidates
    at a count (the step placements and the families of :func:`new_families` within that
    count's FLOPs: LeMiCa's path, the module axis) are ranked on the selection set, and the
    best one meeting the floors there is certified; a certification that fails moves on to
    the next count (recorded as ``rejected``). Computing every step always qualifies.
    """
    check_targets(None, floors.min_psnr, floors.min_psnr_p5)
    steps = template.steps

    def probe_passes(n: int) -> bool:
        if n >= steps:
            return True
        probes = {"even": spaced_gate(steps, n)}
        if sensitivity is not None:
            probes["sensitivity"] = drift_gate(np.asarray(sensitivity) ** SENSITIVITY_POWERS[0], n)
        plans = list(candidate_plans(template, probes).values())
        return any(floors.met_by(f) for f in search.measure("candidates", plans))

    low, high = 2, steps  # invariant: high passes
    while low < high:
        mid = (low + high) // 2
        if probe_passes(mid):
            high = mid
        else:
            low = mid + 1
    provenance = {**(provenance or {}), **{k: v for k, v in vars(floors).items() if v is not None}}
    rejected: list[dict] = []
    jumps = None
    for computed in range(max(high - 1, 2), steps):
        families, jumps, lemica = new_families(template, (computed,), ideal_speedup(template, computed), search, drift,
                                               sensitivity, module_scores, jumps)  # fmt: skip
        gates = candidate_gates(steps, computed, drift, sensitivity, jumps)
        plans, scores, order = _select(template, gates, search, floors.rank, families)
        name = next((n for n in order if floors.met_by(scores[n])), None)
        if name is None:
            continue
        certified = search.certified(plans[name])
        if floors.certified_by(certified):
            figures = {"certified": certified, **({"rejected": rejected} if rejected else {})}
            return replace(plans[name], calibration=_record({**provenance, **lemica}, name, scores, search, **figures))
        rejected.append({"candidate": name, "computed": computed, **certified.to_json()})
    full = gate_plan(template, np.zeros(steps, dtype=bool))
    figures = {"certified": search.certified(full), **({"rejected": rejected} if rejected else {})}
    return replace(full, calibration=_record(provenance, "full", {}, search, **figures))
