"""The plan format: canonical bytes, validation, reference import/export, derived figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support import official_plan_files

import invardiff
from invardiff import CachePlan, PlanError, PlanTarget, all_compute_plan, load_plan
from invardiff.plan import hold_after


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
