"""The plan format: canonical bytes, validation, reference import/export, derived figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support import official_plan_files

import invardiff
from invardiff import CachePlan, PlanError, PlanTarget, all_compute_plan, load_plan
from invardiff.plan import (
    MODULE_REUSE,
    STEP_REUSE,
    hidden_held,
    hold_after,
    module_held,
    peak_cached_elements,
    peak_cached_elements_within_steps,
)


def small_plan() -> CachePlan:
    gate = np.array([0, 0, 1, 0, 1, 1, 0, 0], bool)
    attn = np.zeros((8, 2), bool)
    attn[[2, 4, 5], :] = True
    attn[1, 1] = attn[7, 0] = True
    return CachePlan(
        arch="dit",
        step_gate=gate,
        modules={"attn": attn, "mlp": np.zeros((8, 2), bool)},
        target=PlanTarget(model_id="m", timesteps=tuple(float(t) for t in range(800, 0, -100))),
    )


def test_canonical_bytes_and_identity_are_stable(tmp_path):
    plan = small_plan()
    path = plan.save(tmp_path / "p.json")
    assert path.read_bytes() == plan.to_bytes()
    loaded = CachePlan.load(path)
    assert loaded == plan and loaded.sha256 == plan.sha256
    # the same document with other key order and whitespace is the same plan
    pretty = json.dumps(json.loads(plan.to_bytes()), indent=3).encode()
    assert CachePlan.from_bytes(pretty).sha256 == plan.sha256
    assert small_plan().with_flags(plan.step_gate, {**plan.modules, "mlp": plan.modules["attn"]}).sha256 != plan.sha256


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.pop("arch"), "missing field 'arch'"),
        (lambda d: d.update(format_version=9), "unsupported format_version 9"),
        (lambda d: d.update(step_gate="0012"), "step_gate: must be a string of 0 and 1"),
        (lambda d: d["modules"].pop("mlp"), "missing mlp"),
        (lambda d: d["modules"]["attn"].pop(), "modules.attn: expected 8 rows"),
        (lambda d: d.update(steps=9), "steps is 9 but step_gate has 8"),
        (lambda d: d["modules"]["attn"].__setitem__(0, "11"), "step 0 can never reuse"),
        (lambda d: d["summary"].update(ideal_speedup=9.0), "summary does not match the flags"),
        (lambda d: d["target"].update(timesteps=[1, 2, 3, 4, 5, 6, 7, 8]), None),
        (lambda d: d["target"].update(timesteps=[1, 2]), "target.timesteps has 2 entries for 8 steps"),
        (lambda d: d["target"].update(colour="red"), "target: unknown field"),
    ],
)
def test_malformed_or_inconsistent_files_are_rejected_by_name(tmp_path, edit, message):
    document = json.loads(small_plan().to_bytes())
    edit(document)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    if message is None:  # a monotonic increasing schedule is fine
        CachePlan.load(path)
        return
    with pytest.raises(PlanError, match=message):
        CachePlan.load(path)


def test_unreadable_and_non_plan_files_are_rejected(tmp_path):
    with pytest.raises(PlanError, match="cannot read plan"):
        load_plan(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('{"hello": 1}')
    with pytest.raises(PlanError, match="not an invardiff cache plan"):
        load_plan(tmp_path / "y.json")


@pytest.mark.parametrize("path", official_plan_files(), ids=lambda p: p.name[:40])
def test_reference_plans_import_and_export_exactly(tmp_path, path):
    plan = load_plan(path)
    assert plan.target.steps == (50 if plan.arch == "dit" else 28)
    assert plan.layer_counts() == (
        {"attn": 28, "mlp": 28} if plan.arch == "dit"
        else {"attn": 19, "context_attn": 19, "ff": 19, "context_ff": 19, "single_attn": 38, "single_mlp": 38}
    )  # fmt: skip
    original = json.loads(path.read_bytes())
    assert np.array_equal(plan.step_gate, original["step_cache_book"])
    out = plan.export_official(tmp_path / path.name)
    assert json.loads(out.read_bytes()) == original
    if b"\r\n" not in path.read_bytes():  # one shipped file uses CRLF line ends
        assert out.read_bytes() == path.read_bytes()
    # through the native format and back
    native = CachePlan.from_bytes(plan.to_bytes())
    assert json.loads(native.export_official(tmp_path / "again.json").read_bytes()) == original
    assert plan.calibration["params"]["steps"] == plan.steps


def test_reference_import_takes_target_overrides():
    plan = load_plan(official_plan_files("flux")[0], model_id="acme/flux-ft", revision="abc123")
    assert plan.target.model_id == "acme/flux-ft" and plan.target.revision == "abc123"
    assert plan.target.height == 1024 and plan.target.guidance == 3.5


def test_summary_figures():
    plan = load_plan(official_plan_files("dit")[1])
    summary = plan.summary()
    assert 2.5 < summary.ideal_speedup < 3.2  # reference reports 2.86x end to end for this plan
    assert summary.reused_steps == int(plan.step_gate.sum())
    full = all_compute_plan("dit", 50, {"attn": 28, "mlp": 28})
    assert full.summary().ideal_speedup == 1.0 and full.summary().peak_cache_bytes == 0
    assert invardiff.load_plan(official_plan_files("flux")[1]).summary().ideal_speedup > 3.0


def test_hold_after_keeps_exactly_what_is_reused_later():
    plan = small_plan()
    hold, hold_hidden = hold_after(plan)
    # H: computed at 1 and 3, reused at 2, 4, 5
    assert hold_hidden.tolist() == [False, True, False, True, True, False, False, False]
    # attn layer 1: computed at 0 and reused at 1, later computed again and never reused
    assert hold["attn"][:, 1].tolist() == [True, False, False, False, False, False, False, False]
    assert hold["attn"][:, 0].tolist() == [False, False, False, False, False, False, True, False]
    assert hold["mlp"].sum() == 0


def test_every_field_of_a_plan_is_part_of_its_identity():
    from dataclasses import fields, replace

    from invardiff import Geometry

    base = replace(small_plan(), geometry=Geometry(dim=8, tokens=4), calibration={"q": 0.5}, extras={"e": 1})
    target_changes = {
        "model_id": "other", "revision": "abc", "pipeline": "P", "scheduler": "S", "scheduler_config_hash": "00",
        "timesteps": tuple(float(t) for t in range(801, 1, -100)), "height": 64, "width": 64, "guidance": 4.0,
        "dtype": "bfloat16",
    }  # fmt: skip
    # steps is the flags' length, validated against them: it cannot change alone
    assert set(target_changes) | {"steps"} == {f.name for f in fields(PlanTarget)}, "a new target field: add it here"
    geometry_changes = {"dim": 16, "tokens": 8, "context_tokens": 2, "mlp_ratio": 2.0}
    assert set(geometry_changes) == {f.name for f in fields(Geometry)}
    mlp = base.modules["mlp"].copy()
    mlp[3, 1] = True
    variants = {f"target.{k}": replace(base, target=replace(base.target, **{k: v})) for k, v in target_changes.items()}
    variants |= {f"geometry.{k}": replace(base, geometry=replace(base.geometry, **{k: v}))
                 for k, v in geometry_changes.items()}  # fmt: skip
    variants |= {
        "geometry": replace(base, geometry=None),
        "step_gate": base.with_flags(np.roll(base.step_gate, 1), base.modules),
        "modules": base.with_flags(base.step_gate, {**base.modules, "mlp": mlp}),
        "calibration": replace(base, calibration={"q": 0.6}),
        "extras": replace(base, extras={"e": 2}),
    }
    identities = {name: plan.sha256 for name, plan in variants.items()}
    assert base.sha256 not in identities.values()
    assert len(set(identities.values())) == len(identities)  # every change is its own plan
    for name, plan in variants.items():  # and survives the round trip through its bytes
        assert CachePlan.from_bytes(plan.to_bytes()).sha256 == identities[name], name


def _preset_values_from_file_name(name: str) -> dict[str, float]:
    """The reference file names spell their settings: n (nonskip), th/sth (q_step), msa/attn, ..."""
    keys = {"n": "nonskip", "th": "q_step", "sth": "q_step", "msa": "q_attn", "mlp": "q_mlp", "attn": "q_attn",
            "ff": "q_ff", "ctxff": "q_context_ff", "sattn": "q_single_attn", "smlp": "q_single_mlp"}  # fmt: skip
    values = {}
    for part in name.removesuffix(".json").split("_"):
        letters = part.rstrip("0123456789.")
        if letters in keys and part != letters:
            values[keys[letters]] = float(part[len(letters):])
    return values


# ALGORITHM.md §6 and the reference plans' file names: which file is which preset.
PRESET_FILES = {
    ("dit", "fast"): "dit_cache_books_stp50_n0.0_sth0.63_msa0.22_mlp0.22.json",
    ("dit", "slow"): "dit_cache_books_stp50_n0.0_sth0.61_msa0.2_mlp0.2.json",
    ("flux", "fast"): "flux_cache_books_stp28_n0.1_th0.7_attn0.68_ff0.68_ctxff0.68_sattn0.68_smlp0.68.json",
    ("flux", "slow"): "flux_cache_books_stp28_n0.22_th0.72_attn0.68_ff0.66_ctxff0_sattn0.68_smlp0.62.json",
}


@pytest.mark.parametrize("arch,preset", list(PRESET_FILES))
def test_presets_are_the_reference_settings(arch, preset):
    from invardiff import CalibrationParams

    name = PRESET_FILES[(arch, preset)]
    assert any(p.name == name for p in official_plan_files(arch))
    expected = _preset_values_from_file_name(name)
    params = CalibrationParams.resolve(arch, preset)
    assert params.nonskip == expected.pop("nonskip") and params.q_step == expected.pop("q_step")
    assert {f"q_{k}": v for k, v in params.q.items() if k != "context_attn"} == expected
    assert params.q.get("context_attn", params.q["attn"]) == params.q["attn"]  # one joint attention, one quantile
    if arch == "flux":  # context_attn follows attn (and nothing else), also when attn is overridden
        assert CalibrationParams.resolve(arch, preset, q_attn=0.31).q == {**params.q, "attn": 0.31, "context_attn": 0.31}


# ---- step_reuse: what a reused step's H is ------------------------------------------------
# the sha256 of this reference plan as imported before step_reuse existed (main at aad92d3)
DIT_FAST_SHA256 = "92636984a0de8e2f5680aeabff1e19d28794ed97d175fd4b4931b1b9d0737e82"


def test_step_reuse_linear_is_its_own_plan_and_hold_keeps_the_old_bytes(tmp_path):
    plan = load_plan(official_plan_files("dit")[1])
    assert plan.step_reuse == "hold" and plan.sha256 == DIT_FAST_SHA256
    assert b"step_reuse" not in plan.to_bytes()
    linear = plan.with_step_reuse("linear")
    assert linear.sha256 != plan.sha256 and json.loads(linear.to_bytes())["step_reuse"] == "linear"
    again = CachePlan.from_bytes(linear.to_bytes())
    assert again.step_reuse == "linear" and again.sha256 == linear.sha256
    assert linear.with_flags(linear.step_gate, linear.modules).step_reuse == "linear"
    assert linear.with_step_reuse("hold").sha256 == DIT_FAST_SHA256
    spelled_out = {**json.loads(plan.to_bytes()), "step_reuse": "hold"}  # "hold" written out is the same plan
    assert CachePlan.from_json(spelled_out).sha256 == DIT_FAST_SHA256


def test_unknown_step_reuse_is_rejected_and_linear_plans_do_not_export(tmp_path):
    document = {**json.loads(small_plan().to_bytes()), "step_reuse": "quadratic"}
    with pytest.raises(PlanError, match="step_reuse: unknown rule 'quadratic'"):
        CachePlan.from_json(document)
    with pytest.raises(PlanError, match="step_reuse"):
        small_plan().with_step_reuse("cubic")
    with pytest.raises(PlanError, match="reference format cannot express step_reuse='linear'"):
        small_plan().with_step_reuse("linear").export_official(tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_linear_step_reuse_holds_one_more_hidden_state_where_it_needs_it():
    plan = small_plan()  # computed 0, 1, 3, 6, 7; reused 2, 4, 5
    keep_last, keep_prev = hidden_held(plan.with_step_reuse("linear"))
    assert keep_last.tolist() == [True, True, True, True, True, False, False, False]
    assert keep_prev.tolist() == [False, True, False, True, True, False, False, False]
    (hold_last,) = hidden_held(plan)
    assert hold_last.tolist() == hold_after(plan)[1].tolist()
    elements = {"attn": 0, "mlp": 0, "hidden": 1}  # count hidden states only
    assert peak_cached_elements(plan, elements) == 1
    assert peak_cached_elements(plan.with_step_reuse("linear"), elements) == 2
    full = load_plan(official_plan_files("dit")[1])
    hidden_bytes = 256 * 1152 * 4  # DiT-XL/2 at 256 px: one H in float32
    assert full.with_step_reuse("linear").summary().peak_cache_bytes == full.summary().peak_cache_bytes + hidden_bytes


# ---- timestep rules and module forecasting (module_reuse) ---------------------------------
def test_new_rules_are_their_own_plans_and_hold_keeps_the_old_bytes(tmp_path):
    plan = load_plan(official_plan_files("dit")[1])
    assert plan.module_reuse == "hold" and b"module_reuse" not in plan.to_bytes()
    spelled_out = {**json.loads(plan.to_bytes()), "module_reuse": "hold", "step_reuse": "hold"}
    assert CachePlan.from_json(spelled_out).sha256 == DIT_FAST_SHA256
    seen = {DIT_FAST_SHA256}
    for step_reuse in STEP_REUSE:
        for module_reuse in MODULE_REUSE:
            variant = plan.with_step_reuse(step_reuse).with_module_reuse(module_reuse)
            again = CachePlan.from_bytes(variant.to_bytes())
            assert (again.step_reuse, again.module_reuse, again.sha256) == (step_reuse, module_reuse, variant.sha256)
            assert variant.with_flags(variant.step_gate, variant.modules).module_reuse == module_reuse
            seen.add(variant.sha256)
            if (step_reuse, module_reuse) != ("hold", "hold"):
                with pytest.raises(PlanError, match="reference format cannot express"):
                    variant.export_official(tmp_path / "out.json")
                assert not (tmp_path / "out.json").exists()
    assert len(seen) == len(STEP_REUSE) * len(MODULE_REUSE)
    assert plan.with_module_reuse("linear").with_module_reuse("hold").sha256 == DIT_FAST_SHA256


@pytest.mark.parametrize("field,value", [("module_reuse", "quadratic"), ("step_reuse", "cubic-t")])
def test_an_unknown_rule_is_a_one_line_plan_error(field, value):
    document = {**json.loads(small_plan().to_bytes()), field: value}
    with pytest.raises(PlanError, match=f"^{field}: unknown rule '{value}' \\(known: [a-z, -]+\\)$"):
        CachePlan.from_json(document)


def test_extrapolating_rules_hold_the_extra_hidden_states_between_and_within_steps():
    """small_plan computes 0, 1, 3, 6, 7 and reuses 2, 4, 5 (H only in this count)."""
    plan = small_plan()
    assert hidden_held(plan.with_step_reuse("linear-t")).tolist() == hidden_held(plan.with_step_reuse("linear")).tolist()
    _, prev, oldest = hidden_held(plan.with_step_reuse("quadratic-t"))
    assert oldest.tolist() == [False, False, False, True, True, False, False, False]  # 3 computed, next reused
    assert prev.tolist() == [False, True, True, True, True, False, False, False]  # 1 serves 4 (from 0, 1, 3)
    elements = {"attn": 0, "mlp": 0, "hidden": 1}
    expected = {"hold": 1, "linear": 2, "linear-t": 2, "quadratic-t": 3}
    for rule, count in expected.items():
        assert peak_cached_elements(plan.with_step_reuse(rule), elements) == count
        assert peak_cached_elements_within_steps(plan.with_step_reuse(rule), elements) == count, rule
    full = load_plan(official_plan_files("dit")[1])
    hidden_bytes = 256 * 1152 * 4  # DiT-XL/2 at 256 px: one H in float32
    for rule, count in expected.items():  # with module outputs the peak step may hold fewer H
        variant = full.with_step_reuse(rule)
        extra = variant.summary().peak_cache_bytes - full.summary().peak_cache_bytes
        extra_within = variant.peak_cache_bytes_within_steps() - full.peak_cache_bytes_within_steps()
        assert extra in ((count - 1) * hidden_bytes, min(count - 1, 1) * hidden_bytes), rule
        assert extra_within in ((count - 1) * hidden_bytes, min(count - 1, 1) * hidden_bytes), rule
        assert variant.summary().executed_fraction == full.summary().executed_fraction


def test_module_forecasts_hold_one_more_output_per_forecast_module():
    plan = small_plan()  # attn layer 1: computed 0, reused 1, computed 3 (2 skipped), reused 4-5 (skipped)...
    (hold,) = module_held(plan)["attn"]
    last, prev = module_held(plan.with_module_reuse("linear"))["attn"]
    assert hold.tolist() == hold_after(plan)[0]["attn"].tolist()
    assert (last >= hold).all() and (prev <= hold).all()
    # attn layer 0 is reused at step 7 after computing 0, 1, 3, 6: 6 keeps its output, 3 too (it becomes the older point)
    assert last[:, 0].tolist() == [False, False, False, True, True, True, True, False]
    assert prev[:, 0].tolist() == [False, False, False, False, False, False, True, False]
    elements = {"attn": 10, "mlp": 0, "hidden": 0}
    for rule in ("linear", "linear-t"):
        variant = plan.with_module_reuse(rule)
        assert peak_cached_elements(variant, elements) == 10 * int((last.astype(int) + prev).sum(axis=1).max())
        assert peak_cached_elements_within_steps(variant, elements) >= peak_cached_elements(variant, elements)
        assert variant.summary().executed_fraction == plan.summary().executed_fraction
    full = load_plan(official_plan_files("dit")[1])
    forecast = full.with_module_reuse("linear")
    assert forecast.summary().peak_cache_bytes > full.summary().peak_cache_bytes
    assert forecast.peak_cache_bytes_within_steps() > full.peak_cache_bytes_within_steps()
    assert forecast.summary().executed_fraction == full.summary().executed_fraction
