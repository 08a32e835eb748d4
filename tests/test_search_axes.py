"""New candidate families of the budget search: LeMiCa's path DAG and the module axis (pure)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from search_support import per_plan

import invardiff
from invardiff.budget import (
    STEP_RULES,
    budget_plan,
    candidate_gates,
    drift_from_ratios,
    step_sensitivity,
)
from invardiff.certify import Search
from invardiff.module_axis import (
    MODULE_RULES,
    UNITS,
    admissible,
    fill_budget,
    module_candidates,
    ranked_units,
    reuse_units,
)
from invardiff.paths import best_path, jump_bound, jump_costs, jump_plans, path_cost, usable_jumps
from invardiff.schedules import gate_plan, spaced_gate

FLUX_LAYERS = {"attn": 2, "context_attn": 2, "ff": 2, "context_ff": 2, "single_attn": 6, "single_mlp": 6}
DIT_LAYERS = {"attn": 4, "mlp": 4}
STEPS = 28


def flux_template(steps: int = STEPS):
    return invardiff.all_compute_plan("flux", steps, FLUX_LAYERS, geometry=invardiff.Geometry(64, 64, 4))


def dit_template(steps: int = 20):
    return invardiff.all_compute_plan("dit", steps, DIT_LAYERS, geometry=invardiff.Geometry(64, 64))


def random_scores(template, seed: int = 0) -> dict[str, np.ndarray]:
    """Merged phase-1 statistics' shape: per kind [T x L] change scores, and H's ratios."""
    rng = np.random.default_rng(seed)
    scores = {kind: rng.uniform(0.5, 1.5, (template.steps, layers)) for kind, layers in template.layer_counts().items()}
    return {"hidden": rng.uniform(0.8, 1.2, (template.steps, 1)), **scores}


def run_mse(plan) -> float:
    """Error of a plan as a sum over its runs of reused steps: (run length)^2 times a weight
    that grows towards the end, so where the runs sit matters."""
    computed = np.flatnonzero(~plan.step_gate)
    return sum((j - i - 1) ** 2 * (1.0 + i / plan.steps) * 1e-5 for i, j in itertools.pairwise(computed))


def additive_measure(plans):
    """A measure additive over a path's jumps (LeMiCa's model), in PSNR dB."""
    return [float("inf") if run_mse(p) == 0 else -10.0 * np.log10(run_mse(p)) for p in plans]


# ---- the DAG ------------------------------------------------------------------------------
def as_measure(score_plans):
    """The search's measure protocol (``measure(plans, done)``) from plans -> PSNR dB."""

    def measure(plans, done):
        values = score_plans(plans)
        for _ in plans:
            done()
        return values

    return measure


def brute_force(costs: np.ndarray, computed: int) -> float:
    steps = costs.shape[0]
    best = np.inf
    for inner in itertools.combinations(range(1, steps - 1), computed - 2):
        nodes = (0, *inner, steps - 1)
        best = min(best, sum(costs[i, j] for i, j in itertools.pairwise(nodes)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_best_path_matches_brute_force_on_synthetic_costs(seed):
    rng = np.random.default_rng(seed)
    steps = 5 + seed % 4
    max_jump = 2 + seed % 3
    costs = np.full((steps, steps), np.inf)
    for i in range(steps):
        for j in range(i + 1, min(i + max_jump, steps - 1) + 1):
            costs[i, j] = rng.uniform(0.0, 1.0)
    for computed in range(2, steps + 1):
        expected = brute_force(costs, computed)
        gate = best_path(costs, computed)
        if not np.isfinite(expected):
            assert gate is None
            continue
        assert gate is not None and (~gate).sum() == computed and not gate[0] and not gate[-1]
        assert path_cost(costs, gate) == pytest.approx(expected)


def test_jump_bound_is_the_shortest_that_leaves_a_choice():
    for steps, computed in ((28, 10), (28, 8), (50, 18), (50, 14), (7, 7), (9, 2)):
        bound = jump_bound(steps, computed)
        within = np.subtract.outer(np.arange(steps), np.arange(steps)) >= -bound
        assert best_path(np.where(within, 1.0, np.inf), computed) is not None  # a path exists
        assert (bound - 1) * (computed - 1) <= steps - 1  # one less: no path, or only even jumps
    with pytest.raises(ValueError, match="2 .. 28"):
        jump_bound(28, 1)


def brute_edges(steps: int, max_jump: int, computed: int) -> set[tuple[int, int]]:
    edges = set()
    for inner in itertools.combinations(range(1, steps - 1), computed - 2):
        nodes = (0, *inner, steps - 1)
        jumps = list(itertools.pairwise(nodes))
        if all(j - i <= max_jump for i, j in jumps):
            edges |= {(i, j) for i, j in jumps if j - i >= 3}
    return edges


def test_only_jumps_on_some_feasible_path_are_measured():
    assert usable_jumps(12, 4, (11,)) == []  # 11 of 12 computed: one jump of 2, never 3 or 4
    for steps, bound, counts in ((12, 4, (4,)), (12, 4, (5, 4)), (14, 3, (6,)), (10, 5, (3, 4))):
        expected = set().union(*(brute_edges(steps, bound, c) for c in counts))
        edges = usable_jumps(steps, bound, counts)
        assert edges and set(edges) == expected and len(edges) == len(expected)


def test_jump_costs_reuse_the_profile_and_measure_each_longer_jump_once():
    template = flux_template(12)
    measured = []

    def measure(plans):
        measured.extend(plans)
        return additive_measure(plans)

    profile = np.arange(12, dtype=np.float64)  # stands for step_sensitivity's output
    edges = usable_jumps(12, 4, (5, 4))
    costs = jump_costs(template, measure, profile, edges, "linear")
    assert len(measured) == len(edges) and len({p.sha256 for p in measured}) == len(measured)
    assert all(p.step_reuse == "linear" for p in measured)
    for (i, j), plan in jump_plans(template, edges, "linear").items():
        assert list(np.flatnonzero(plan.step_gate)) == list(range(i + 1, j))
        assert costs[i, j] == pytest.approx(run_mse(plan))
    assert all(costs[i, i + 1] == 0.0 for i in range(11))
    assert all(costs[k - 1, k + 1] == profile[k] for k in range(1, 11))  # length 2: the profile, not measured
    assert np.isinf(costs[0, 5]) and np.isinf(costs[3, 2])


def test_lemica_is_a_candidate_under_each_step_rule_and_the_optimum_of_an_additive_error():
    template = flux_template()
    counted = []

    def measure(plans):
        counted.append(len(plans))
        return additive_measure(plans)

    plan = budget_plan(template, random_scores(template), target_speedup=3.5, measure=as_measure(measure))  # 8 computed
    assert plan.calibration["candidate"].startswith("modules+")  # more steps: free under this measure
    record = plan.calibration
    assert record["lemica_max_jump"] == jump_bound(STEPS, 8) == 4
    edges = usable_jumps(STEPS, 4, (8, 7))
    assert counted[:2] == [STEPS - 2, len(edges)] and record["lemica_jumps_measured"] == len(edges) == 19
    # under an error additive over jumps, LeMiCa's path is the optimum of every gate with 8 steps
    # and jumps <= 4 (a placement already listed under another name keeps that name)
    costs = np.full((STEPS, STEPS), np.inf)
    for i in range(STEPS):
        for j in range(i + 1, min(i + 4, STEPS - 1) + 1):
            costs[i, j] = (j - i - 1) ** 2 * (1.0 + i / STEPS) * 1e-5
    optimum = best_path(costs, 8)
    scores = random_scores(template)
    gates = candidate_gates(STEPS, 8, drift_from_ratios(scores["hidden"]), step_sensitivity(template, Search(as_measure(additive_measure))),
                            jumps=costs)  # fmt: skip
    lemica = next(n for n, g in gates.items() if np.array_equal(g, optimum))
    best = additive_measure([gate_plan(template, optimum)])[0]
    for rule in STEP_RULES:  # measured under each step rule
        assert record["candidates_psnr"][lemica if rule == "hold" else f"{lemica}+{rule}"] == pytest.approx(best, abs=1e-3)
    for name, gate in gates.items():  # nothing within the jump bound beats it
        assert np.diff(np.flatnonzero(~gate)).max() > 4 or record["candidates_psnr"][name] <= best + 1e-3
    # cost: profile (T-2), the longer jumps, then all candidates; within 2x of the search without them
    old = [n for n in record["candidates_psnr"] if not n.startswith(("lemica", "modules"))]
    assert sum(counted) <= 2 * (STEPS - 2 + len(old))


def test_lemica_gate_is_listed_when_no_other_placement_has_it():
    costs = np.full((STEPS, STEPS), np.inf)
    for i in range(STEPS - 1):
        for j in range(i + 1, min(i + 4, STEPS - 1) + 1):
            costs[i, j] = 1.0 if j - i > 2 else 0.0
    costs[5, 9] = costs[20, 24] = 0.0  # two free long jumps somewhere odd
    gates = candidate_gates(STEPS, 10, jumps=costs)
    assert "lemica" in gates and path_cost(costs, gates["lemica"]) < path_cost(costs, gates["even"])


def test_lemica_is_left_out_when_its_jumps_would_double_the_search():
    template = flux_template(50)
    counted = []

    def measure(plans):
        counted.append(len(plans))
        return additive_measure(plans)

    plan = budget_plan(template, random_scores(template), target_speedup=50 / 14, measure=as_measure(measure))
    assert len(usable_jumps(50, jump_bound(50, 14), (14, 13))) == 81  # > the 48 + 2 x (candidates) of today
    assert "lemica_max_jump" not in plan.calibration and len(counted) == 2
    assert not any(n.startswith("lemica") for n in plan.calibration["candidates_psnr"])


# ---- the module axis ------------------------------------------------------------------------
@pytest.mark.parametrize("template", [flux_template(), dit_template()], ids=["flux", "dit"])
def test_module_reuse_fills_the_budget_with_the_lowest_scoring_modules(template):
    scores = random_scores(template)
    target = template.steps / 9  # 9 computed steps' ideal
    base = gate_plan(template, spaced_gate(template.steps, 11), step_reuse="linear")
    plan = fill_budget(base, scores, target)
    assert plan is not None and admissible(plan, target)
    assert plan.summary().executed_fraction <= 1.0 / target + 1e-6  # the FLOPs that run fit the budget
    assert np.array_equal(plan.step_gate, base.step_gate) and plan.step_reuse == "linear"
    ranked = ranked_units(base, scores)
    chosen = {(s, u, layer) for s, u, layer in ranked if plan.modules[UNITS[template.arch][u][0]][s, layer]}
    assert chosen == set(ranked[: len(chosen)])  # exactly the lowest-scoring units
    assert not admissible(reuse_units(base, ranked[: len(chosen) - 1]), target)  # the fewest that fit
    computed = ~plan.step_gate
    for flags in plan.modules.values():  # never on the first or last step
        assert not (flags[0] & computed[0]).any() and not (flags[-1] & computed[-1]).any()
    if template.arch == "flux":  # both halves of the joint attention, or neither
        assert np.array_equal(plan.modules["attn"], plan.modules["context_attn"])


def test_module_ranking_follows_the_scores():
    template = dit_template(8)
    scores = {"attn": np.full((8, 4), 2.0), "mlp": np.full((8, 4), 3.0)}
    scores["mlp"][3, 2] = 0.1
    scores["attn"][5, 1] = 0.2
    scores["attn"][0, 0] = scores["attn"][7, 3] = 0.0  # first and last step: never taken
    ranked = ranked_units(gate_plan(template, np.zeros(8, dtype=bool)), scores)
    assert ranked[:2] == [(3, 1, 2), (5, 0, 1)]
    assert {s for s, _, _ in ranked} == set(range(1, 7)) and len(ranked) == 6 * 8


def test_module_candidates_compute_more_steps_under_the_same_budget():
    template = flux_template()
    target = 2.8  # 10 computed steps step-only
    candidates = module_candidates(template, random_scores(template), target, 10, ("linear",))
    suffixes = {"hold": "", **{rule: f"+module-{rule}" for rule in MODULE_RULES if rule != "hold"}}
    assert set(candidates) == {f"modules+{e}+linear{suffix}" for e in (1, 2, 3) for suffix in suffixes.values()}
    for extra in (1, 2, 3):
        plan = candidates[f"modules+{extra}+linear"]
        assert (~plan.step_gate).sum() == 10 + extra and admissible(plan, target)
        assert any(flags[~plan.step_gate].any() for flags in plan.modules.values())
        for rule, suffix in suffixes.items():  # each forecasting candidate: the same flags, its own rule
            forecast = candidates[f"modules+{extra}+linear{suffix}"]
            assert forecast.module_reuse == rule and forecast.step_reuse == "linear"
            assert forecast.with_module_reuse("hold").sha256 == plan.sha256
    assert module_candidates(template, random_scores(template), 14.0, 2, ("linear",)) == {}  # cannot fit


def test_budget_search_measures_the_module_axis_and_keeps_an_admissible_winner():
    template = flux_template()
    def favour_steps(plans):  # fidelity grows with computed steps, whatever modules do
        return [float((~p.step_gate).sum()) + additive_measure([p])[0] / 1000 for p in plans]

    plan = budget_plan(template, random_scores(template), target_speedup=2.8, measure=as_measure(favour_steps))
    assert plan.calibration["candidate"] == "modules+3+linear" and (~plan.step_gate).sum() == 13
    assert plan.summary().ideal_speedup >= 2.8
    assert {"modules+1+linear", "modules+2+linear"} <= set(plan.calibration["candidates_psnr"])
    assert "modules+1" not in plan.calibration["candidates_psnr"]  # built on the profile's rule only
    assert len(candidate_gates(STEPS, 10)) >= 4  # the step-only families are still there


def test_a_joint_attention_ranks_by_its_busier_half():
    template = flux_template(6)
    scores = {kind: np.full((6, layers), 1.0) for kind, layers in template.layer_counts().items()}
    scores["attn"][2, 0] = 0.1  # the image half barely changes, the text half does
    scores["context_attn"][2, 0] = 5.0
    scores["ff"][3, 1] = 0.2
    ranked = ranked_units(gate_plan(template, np.zeros(6, dtype=bool)), scores)
    assert ranked[0] == (3, 1, 1) and ranked[-1] == (2, 0, 0)


def module_rule_aware(plans):
    """Fidelity grows with the computed steps, plus 2 dB for a first-order module forecast
    (a measure that tells the module rules apart)."""
    bonus = {"hold": 0.0, "linear": 2.0}
    return [30.0 + float((~p.step_gate).sum()) + bonus[p.module_reuse] for p in plans]


def test_module_forecasting_candidates_are_measured_and_returned_with_their_rule():
    template = flux_template()
    measured = []

    def measure(plans):
        measured.extend(plans)
        return module_rule_aware(plans)

    plan = budget_plan(template, random_scores(template), target_speedup=2.8, measure=as_measure(measure))
    record = plan.calibration
    assert record["candidate"] == "modules+3+linear+module-linear" and plan.module_reuse == "linear"
    assert plan.step_reuse == "linear" and (~plan.step_gate).sum() == 13 and admissible(plan, 2.8)
    by_name = dict(zip(record["candidates_psnr"], measured[-len(record["candidates_psnr"]):]))
    for name, measured_plan in by_name.items():  # measured under the rule it is named for
        expected = name.split("+module-")[1] if "+module-" in name else "hold"
        assert measured_plan.module_reuse == expected
    assert record["candidates_psnr"]["modules+3+linear"] == pytest.approx(30.0 + 13)


def jump_error(i: int, j: int) -> float:
    """A jump's error: its length squared, except one free jump 16 -> 19 (not on the even path)."""
    return 1e-12 if (i, j) == (16, 19) else (j - i - 1) ** 2 * 1e-5


@pytest.mark.parametrize("family", ["modules", "lemica"])
def test_min_psnr_searches_the_new_families_too(family):
    """Step placements reach 55 dB with 9 computed steps; only the family's candidates do with
    8 steps' FLOPs (LeMiCa: the path through the free jump; modules: forecast linearly)."""
    template = flux_template()
    costs = np.full((STEPS, STEPS), np.inf)
    for i in range(STEPS - 1):
        for j in range(i + 1, min(i + 4, STEPS - 1) + 1):
            costs[i, j] = 0.0 if j == i + 1 else jump_error(i, j)
    lemica = best_path(costs, 8)

    def score(plan):
        reused = np.flatnonzero(plan.step_gate)
        computed = np.flatnonzero(~plan.step_gate)
        runs = [(i, j) for i, j in itertools.pairwise(computed) if j > i + 1]
        if len(runs) == 1:  # the profile and LeMiCa's jumps
            return -10.0 * np.log10(jump_error(*runs[0]))
        if any((flags[computed]).any() for flags in plan.modules.values()):
            return 60.0 if family == "modules" and plan.module_reuse == "linear" else 30.0
        if len(computed) >= 9 or (family == "lemica" and np.array_equal(plan.step_gate, lemica)):
            return 60.0 if len(reused) else float("inf")
        return 30.0 + len(computed) / 10

    plan = budget_plan(template, random_scores(template), min_psnr=55.0, measure=per_plan(score),
                       certify=per_plan(score))  # fmt: skip
    record = plan.calibration
    assert record["candidate"].startswith(family) and score(plan) == 60.0
    assert plan.summary().ideal_speedup >= STEPS / 8  # 8 computed steps' FLOPs
    if family == "modules":
        assert plan.module_reuse == "linear" and record["candidate"].endswith("+module-linear")
    else:
        assert np.array_equal(plan.step_gate, lemica) and record["lemica_max_jump"] == 4
