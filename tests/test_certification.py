"""Selection and certification of budget plans: disjoint seed sets, per-sample figures, the
certified floors, the search's arithmetic, and progress lines (synthetic measures, plus one
real calibration of digits-flux on few steps)."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch
from search_support import STEPS, flux_template, per_plan

import invardiff
from invardiff import metrics
from invardiff.budget import (
    budget_plan,
    computed_for_speedup,
    describe_targets,
    drift_gate,
    ideal_speedup,
)
from invardiff.certify import P5_SAMPLES, Fidelity, Search, bound_rank
from invardiff.holdout import (
    batches,
    check_disjoint,
    default_batch,
    held_out_sets,
    holdout_measure,
    merge_calls,
)
from invardiff.schedules import gate_plan, spaced_gate


def computed(plan) -> int:
    return int((~plan.step_gate).sum())


def share(plan) -> float:
    """3.57 dB per computed step of 28: fidelity grows with the computed steps."""
    return 100.0 * computed(plan) / STEPS


def rule_aware(plan) -> float:
    """3 dB per computed step, and 10 dB more where reused steps are extrapolated linearly."""
    return 3.0 * computed(plan) + (10.0 if plan.step_reuse == "linear" else 0.0)


# ---- figures ------------------------------------------------------------------------------------
def test_fidelity_is_mean_and_an_observed_5th_percentile():
    values = [40.0] * 19 + [20.0]  # 20 samples: the lowest is the 5th percentile
    assert Fidelity.of(values) == Fidelity(39.0, 20.0, 20)
    assert Fidelity.of(30.0) == Fidelity(30.0, 30.0, 1)
    identical = Fidelity.of([float("inf"), float("inf")])
    assert identical.to_json() == {"psnr_mean": None, "psnr_p5": None, "samples": 2, "psnr_p5_bound": None}
    with pytest.raises(ValueError, match="NaN"):
        Fidelity.of([1.0, float("nan")])


def test_the_5th_percentile_bound_is_the_order_statistic_binomial_confidence_allows():
    def above(n: int, r: int) -> float:  # P(Binomial(n, 0.05) >= r)
        return 1.0 - sum(math.comb(n, k) * 0.05**k * 0.95 ** (n - k) for k in range(r))

    assert P5_SAMPLES == 45 and bound_rank(44) == 0 and bound_rank(45) == 1
    for n in (8, 44, 45, 48, 76, 77, 100, 400):
        r = bound_rank(n)
        assert (r == 0 or above(n, r) >= 0.9) and above(n, r + 1) < 0.9
    values = np.arange(100.0)[::-1]  # 100 samples: the second smallest bounds the 5th percentile
    assert Fidelity.of(values).p5_bound == 1.0 and Fidelity.of(values[:48]).p5_bound == 52.0
    assert Fidelity.of(values[:44]).p5_bound is None and Fidelity.of(values).to_json()["psnr_p5_bound"] == 1.0


def test_the_bound_is_below_the_true_5th_percentile_nine_times_in_ten():
    # 4000 certifications of 48 samples from a skewed distribution with a known 5th percentile
    rng = np.random.default_rng(0)
    truth = np.log(0.05)  # of a negated exponential (PSNR's long low tail): P(-E <= x) = e^x
    draws = -rng.exponential(size=(4000, 48))
    bounds = np.array([Fidelity.of(d).p5_bound for d in draws])
    assert 0.9 <= np.mean(bounds <= truth) <= 0.93  # 1 - 0.95^48 = 0.915


def test_psnr_is_taken_on_images_in_zero_one():
    a = np.zeros((2, 4, 4, 1))
    b = a + np.array([0.1, 0.01]).reshape(2, 1, 1, 1)
    assert metrics.psnr(a, b, reduction="none") == pytest.approx([20.0, 40.0])


# ---- seed sets ----------------------------------------------------------------------------------
def calls(seeds, label=0):
    return [{"class_labels": [label], "num_inference_steps": 8, "seed": s} for s in seeds]


def seeds(calls_):
    return {c["seed"] for c in calls_}


@pytest.mark.parametrize(
    "calibration",
    [list(range(1000, 1008)), list(range(64)), [5, 1_000_008, 2_000_011, 7], [3, 1_000_006, 1_000_007]],
)
def test_default_sets_are_pairwise_disjoint_whatever_the_calibration_seeds(calibration):
    cal = calls(calibration)
    selection, certification = held_out_sets(cal)
    assert len(selection) == len(certification) == len(cal)
    for a, b in combinations([seeds(cal), seeds(selection), seeds(certification)], 2):
        assert not a & b
    assert [c["class_labels"] for c in certification] == [c["class_labels"] for c in cal]  # same labels
    assert [c["class_labels"] for c in selection] == [c["class_labels"] for c in cal]
    given = calls([99_999])
    assert held_out_sets(cal, certification=given)[1] == given  # a given set is kept as is
    assert held_out_sets(cal, selection=given)[0] == given


def test_a_5th_percentile_floor_certifies_on_enough_fresh_samples():
    cal = [*calls([1000, 1001, 1002], label=1), {"class_labels": [2, 3], "seed": 1003}]  # 5 samples a round
    selection, certification = held_out_sets(cal, min_samples=P5_SAMPLES)
    assert len(selection) == 4 and len(certification) == 4 * 9  # 9 rounds: 45 samples
    assert len(seeds(certification)) == 36 and not seeds(certification) & (seeds(cal) | seeds(selection))
    assert [c["class_labels"] for c in certification] == [c["class_labels"] for c in cal] * 9
    with pytest.raises(ValueError, match="certification set gives 44 sample.*at least 45"):
        held_out_sets(cal, certification=calls(range(2000, 2044)), min_samples=P5_SAMPLES)
    given = [{"class_labels": [0], "num_images_per_prompt": 5, "seed": 2000 + i} for i in range(9)]
    assert held_out_sets(cal, certification=given, min_samples=P5_SAMPLES)[1] == given


def test_the_disjointness_check_compares_every_seed_of_every_set():
    sets = {"calibration": calls([1, 2, 3]), "selection": calls([4, 5, 6]), "certification": calls([7, 8, 9])}
    check_disjoint(**sets)
    for first, second in combinations(sets, 2):
        for position in range(3):  # a later seed of one set repeated at any position of another
            clash = {**sets, second: [*sets[second][:position], sets[first][-1], *sets[second][position + 1:]]}
            with pytest.raises(ValueError, match=f"{second} calls reuse {first} seed"):
                check_disjoint(**clash)
    with pytest.raises(ValueError, match="needs at least one call"):
        held_out_sets(calls([1]), selection=[])
    with pytest.raises(ValueError, match="needs a 'seed'"):
        held_out_sets(calls([1]), certification=[{"class_labels": [0]}])


# ---- the search's arithmetic --------------------------------------------------------------------
def test_the_computed_step_count_is_the_most_the_target_allows():
    template = flux_template(12)
    speedups = {n: ideal_speedup(template, n) for n in range(2, 13)}
    for n, speedup in speedups.items():  # at each count's own speed-up and just either side of it
        for target in (speedup - 1e-6, speedup, speedup + 1e-6):
            if 1.0 <= target <= speedups[2]:
                chosen = computed_for_speedup(template, target)
                assert speedups[chosen] >= target and (chosen == 12 or speedups[chosen + 1] < target)
                assert chosen == (n if target <= speedup else n - 1)


def test_the_drift_program_finds_the_cheapest_placement():
    rng = np.random.default_rng(0)

    def cost(weights, gate):  # a reused step i after computed step j costs sum(w[j+1..i])
        total, last = 0.0, 0
        for i in range(len(gate)):
            if gate[i]:
                total += weights[last + 1 : i + 1].sum()
            else:
                last = i
        return total

    for steps, count in ((7, 3), (8, 4), (9, 3), (10, 5)):
        weights = rng.uniform(0.1, 5.0, steps)
        inner = range(1, steps - 1)
        best = min(cost(weights, np.array([i not in (0, steps - 1, *chosen) for i in range(steps)]))
                   for chosen in combinations(inner, count - 2))  # fmt: skip
        gate = drift_gate(weights, count)
        assert (~gate).sum() == count and cost(weights, gate) == pytest.approx(best)


# ---- the chosen plan and its certification ------------------------------------------------------
@pytest.mark.parametrize("target", [{"target_speedup": 3.0}, {"min_psnr": 40.0}])
def test_the_returned_plan_is_the_one_measured(target):
    measure = per_plan(rule_aware)
    plan = budget_plan(flux_template(), None, **target, measure=measure, certify=measure)
    record = plan.calibration
    assert plan.step_reuse == ("linear" if "+linear" in record["candidate"] else "hold") == "linear"
    assert rule_aware(plan) == record["selected"]["psnr_mean"] == record["certified"]["psnr_mean"]
    assert record["candidates_psnr"][record["candidate"]] == rule_aware(plan)


def test_min_psnr_probes_try_every_step_reuse_rule():
    # linear reaches 40 dB with 10 computed steps, hold only with 14: the fastest is 10
    plan = budget_plan(flux_template(), None, min_psnr=40.0, measure=per_plan(rule_aware),
                       certify=per_plan(rule_aware))  # fmt: skip
    assert computed(plan) == 10 and plan.step_reuse == "linear"


def test_min_psnr_is_the_certified_mean_never_a_selection_figure():
    # certification reads 1 dB below selection: 9 steps select at 32.1 dB but certify at 31.1
    selection, certify = per_plan(share), per_plan(lambda p: share(p) - 1.0)
    plan = budget_plan(flux_template(), None, min_psnr=32.0, measure=selection, certify=certify)
    record = plan.calibration
    assert computed(plan) == 10 and record["certified"]["psnr_mean"] == pytest.approx(share(plan) - 1.0, abs=1e-3)
    assert [(r["computed"], r["psnr_mean"]) for r in record["rejected"]] == [(9, pytest.approx(31.143, abs=1e-3))]
    assert record["certified"]["psnr_mean"] >= 32.0 and record["measured"]["certification"] == 2
    # nothing passes certification: every step computed, certified as identical
    full = budget_plan(flux_template(), None, min_psnr=32.0, measure=selection,
                       certify=per_plan(lambda p: float("inf") if computed(p) == STEPS else 10.0))  # fmt: skip
    assert computed(full) == STEPS and full.calibration["candidate"] == "full"
    assert full.calibration["certified"]["psnr_mean"] is None and len(full.calibration["rejected"]) == STEPS - 9


def test_min_psnr_p5_floors_the_tail():
    def tail(plan):  # 48 samples: 47 at the share, one 8 dB lower (the 5th percentile and its bound)
        return [share(plan)] * 47 + [share(plan) - 8.0]

    plan = budget_plan(flux_template(), None, min_psnr_p5=30.0, measure=per_plan(tail), certify=per_plan(tail))
    certified = plan.calibration["certified"]
    assert computed(plan) == 11 and certified["psnr_p5_bound"] >= 30.0 and certified["samples"] == 48  # 39.3 - 8
    both = budget_plan(flux_template(), None, min_psnr=45.0, min_psnr_p5=30.0, measure=per_plan(tail),
                       certify=per_plan(tail))  # fmt: skip
    assert computed(both) == 13 and both.calibration["min_psnr"] == 45.0 and both.calibration["min_psnr_p5"] == 30.0


def test_min_psnr_p5_is_certified_on_the_bound_not_the_observed_percentile():
    def two_low(plan):  # 100 samples, two 20 dB low: the observed 5th percentile is the share, the bound not
        return [share(plan) - 20.0] * 2 + [share(plan)] * 98

    plan = budget_plan(flux_template(), None, min_psnr_p5=30.0, measure=per_plan(share), certify=per_plan(two_low))
    certified = plan.calibration["certified"]
    assert certified["psnr_p5"] == pytest.approx(share(plan), abs=1e-3)
    assert computed(plan) == 14 and certified["psnr_p5_bound"] == pytest.approx(share(plan) - 20.0, abs=1e-3)
    assert [r["computed"] for r in plan.calibration["rejected"]] == list(range(9, 14))


def test_min_psnr_p5_refuses_a_certification_too_small_for_its_bound():
    with pytest.raises(ValueError, match="needs at least 45 certification samples.*gave 44"):
        budget_plan(flux_template(), None, min_psnr_p5=30.0, measure=per_plan(share),
                    certify=per_plan(lambda p: [share(p)] * 44))  # fmt: skip
    plan = budget_plan(flux_template(), None, min_psnr=30.0, measure=per_plan(share), certify=per_plan(share))
    assert plan.calibration["certified"]["samples"] == 1  # a mean floor takes any certification


def test_speedup_plans_are_certified_too():
    plan = budget_plan(flux_template(), None, target_speedup=2.8, measure=per_plan(share),
                       certify=per_plan(lambda p: [share(p) - 2.0, share(p)]))  # fmt: skip
    assert plan.calibration["certified"] == {"psnr_mean": pytest.approx(share(plan) - 1.0, abs=1e-3),
                                             "psnr_p5": pytest.approx(share(plan) - 2.0, abs=1e-3), "samples": 2,
                                             "psnr_p5_bound": None}  # fmt: skip
    uncertified = budget_plan(flux_template(), None, target_speedup=2.8, measure=per_plan(share))
    assert "certified" not in uncertified.calibration


# ---- progress -----------------------------------------------------------------------------------
def test_progress_names_the_stage_counts_plans_and_gives_an_eta():
    lines: list[str] = []
    budget_plan(flux_template(), None, target_speedup=2.8, measure=per_plan(share), certify=per_plan(share),
                say=lines.append)  # fmt: skip
    profile = [line for line in lines if line.startswith("step profile: ")]
    assert len(profile) == STEPS - 2 and profile[0].startswith("step profile: plan 1/26 measured, ")
    assert all(" s elapsed, ETA " in line for line in lines)
    assert lines[-1].startswith("certification: plan 1/1 measured")
    assert any(line.startswith("candidates: plan 1/") for line in lines)
    assert describe_targets(min_psnr=40.0, min_psnr_p5=35.0) == (
        "a certified mean PSNR of at least 40 dB and a certified 5th-percentile PSNR of at least 35 dB")
    with pytest.raises(ValueError, match="returned 1 values for 26 plans"):
        Search(lambda plans, done: [1.0]).measure("profile", [flux_template()] * 26)


# ---- a real calibration -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux():
    from invardiff.models import load_builtin

    pipe = load_builtin("digits-flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_real_search_selects_and_certifies_on_its_recorded_fresh_sets(flux):
    cal = [{"class_labels": [0, 1, 2], "num_inference_steps": 10, "guidance_scale": 1.5, "seed": 1000}]
    lines: list[str] = []
    plan = invardiff.calibrate(flux, cal, target_speedup=2.5, progress=lines.append)
    record = plan.calibration
    selection, certification = record["holdout"], record["certification"]
    for a, b in combinations([seeds(cal), seeds(selection), seeds(certification)], 2):
        assert not a & b
    # the figures recorded are those of the returned plan on the recorded sets, sample by sample
    picked = holdout_measure(flux, selection)([plan], lambda: None)[0]
    assert record["selected"] == Fidelity.of(picked).to_json() and len(picked) == 3
    fresh = holdout_measure(flux, certification)([plan], lambda: None)[0]
    assert record["certified"] == Fidelity.of(fresh).to_json()
    call = {k: v for k, v in certification[0].items() if k != "seed"}

    def sample():
        return flux(**call, output_type="np", generator=torch.Generator().manual_seed(certification[0]["seed"])).images

    with invardiff.cached(flux, plan):
        out = sample()
    assert fresh == pytest.approx(list(metrics.psnr(out, sample(), 1.0, "none")))  # per image in [0, 1]
    assert "searching the plan for an ideal speed-up of at least 2.5x" in lines
    assert any(line.startswith("step profile: plan 8/8 measured") for line in lines)
    assert lines[-1].startswith("certification: plan 1/1 measured")
    assert not any("{" in line for line in lines)


# ---- batched measurements -----------------------------------------------------------------------
def test_calls_merge_only_when_they_differ_in_seed_and_a_single_condition():
    one = [{"class_labels": [label], "num_inference_steps": 8, "guidance_scale": 1.5, "seed": 10 + label}
           for label in range(5)]  # fmt: skip
    several = {"class_labels": [0, 1], "num_inference_steps": 8, "guidance_scale": 1.5, "seed": 50}
    other = {**one[0], "guidance_scale": 2.0, "seed": 60}
    assert batches(one, 2) == [[0, 1], [2, 3], [4]] and batches(one, 8) == [[0, 1, 2, 3, 4]]
    assert batches([one[0], several, one[1], other, one[2]], 8) == [[0, 2, 4], [1], [3]]
    assert merge_calls(one[:3]) == ({"num_inference_steps": 8, "guidance_scale": 1.5, "class_labels": [0, 1, 2]},
                                    [10, 11, 12])  # fmt: skip
    prompts = [{"prompt": p, "num_inference_steps": 8, "seed": s} for p, s in (("a cat", 3), ("a dog", 1))]
    assert merge_calls(prompts) == ({"num_inference_steps": 8, "prompt": ["a cat", "a dog"]}, [3, 1])
    second = [{**call, "prompt_2": "a photo"} for call in prompts]  # FLUX would not batch prompt_2 along
    assert batches(second, 8) == [[0], [1]]
    for mixed in ([one[0], several], [one[0], other], second):
        with pytest.raises(ValueError, match="only calls with one class label or prompt"):
            merge_calls(mixed)
    assert default_batch(16 * 16) == 8 and default_batch(1024 * 1024) == 2 and default_batch(4096 * 4096) == 1
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        batches(one, 0)


def test_batched_measurements_equal_one_call_at_a_time_sample_by_sample(flux):
    held = [{"class_labels": [label], "num_inference_steps": 8, "guidance_scale": 1.5, "seed": 7000 + 13 * label}
            for label in (3, 1, 4, 1, 5)]  # fmt: skip
    held.insert(2, {"class_labels": [9, 2], "num_inference_steps": 8, "guidance_scale": 1.5, "seed": 7500})  # alone
    template = invardiff.all_compute_plan("flux", 8, {k: 2 if "single" not in k else 6 for k in
                                          ("attn", "context_attn", "ff", "context_ff", "single_attn", "single_mlp")})  # fmt: skip
    plans = [gate_plan(template, spaced_gate(8, 4), step_reuse=rule) for rule in ("hold", "linear")]
    one_by_one = holdout_measure(flux, held, max_batch=1)(plans, lambda: None)
    for cap in (None, 2):  # the default (all five single-label calls in one batch) and pairs
        batched = holdout_measure(flux, held, max_batch=cap)(plans, lambda: None)
        assert len(batched[0]) == 7  # one sample per image, in the order of the calls
        for a, b in zip(batched, one_by_one):
            assert a == pytest.approx(b, abs=1e-3)
    call, seeds = merge_calls([held[0], held[1]])  # the merged call's images are the single calls'
    merged = flux(**call, output_type="np", generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    alone = flux(**{k: v for k, v in held[1].items() if k != "seed"}, output_type="np",
                 generator=torch.Generator().manual_seed(held[1]["seed"])).images  # fmt: skip
    assert np.allclose(merged[1:], alone, atol=1e-5)
