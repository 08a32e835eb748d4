"""Fixed schedules: every-k and evenly spaced step gates as plans."""

from __future__ import annotations

import numpy as np
import pytest

from invardiff import all_compute_plan
from invardiff.schedules import every_k_gate, every_k_plan, spaced_gate


def bits(gate) -> str:
    return "".join("R" if g else "." for g in gate)


def test_every_k_gate_matches_the_documented_schedules():
    assert bits(every_k_gate(28, 3)) == ".RR.RR.RR.RR.RR.RR.RR.RR.RR."
    assert bits(every_k_gate(28, 4)) == ".RRR.RRR.RRR.RRR.RRR.RRR.RR."
    assert bits(every_k_gate(50, 3)) == ".RR" * 16 + ".."
    assert not every_k_gate(10, 1).any()
    with pytest.raises(ValueError, match="k must be at least 1"):
        every_k_gate(10, 0)


def test_spaced_gate_counts_and_ends():
    for steps in (7, 28, 50):
        for computed in range(2, steps + 1):
            gate = spaced_gate(steps, computed)
            assert (~gate).sum() == computed and not gate[0] and not gate[-1]


def test_every_k_plan_reuses_whole_steps_only():
    template = all_compute_plan("flux", 28, {"attn": 2, "context_attn": 2, "ff": 2, "context_ff": 2,
                                             "single_attn": 6, "single_mlp": 6})
    plan = every_k_plan(template, 4)
    assert plan.summary().reused_steps == 20
    for flags in plan.modules.values():
        assert np.array_equal(flags.any(axis=1), plan.step_gate) and np.array_equal(flags.all(axis=1), plan.step_gate)
    assert plan.calibration == {"schedule": "every-k", "k": 4}
    assert plan.summary().ideal_speedup == pytest.approx(28 / 8, rel=1e-4)
