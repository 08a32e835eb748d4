"""Calibrating and caching the trained built-in models, unchanged pipelines (quality checked)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invardiff import cached, calibrate, metrics
from invardiff.cli import calibration_calls
from invardiff.models import load_builtin

LABELS = list(range(10)) * 2


def generate(pipe, steps, seed=0):
    return pipe(class_labels=LABELS, num_inference_steps=steps, guidance_scale=1.5,
                generator=torch.Generator().manual_seed(seed), output_type="np").images  # fmt: skip


@pytest.mark.parametrize("name,steps", [("digits-dit", 50), ("digits-flux", 28)])
def test_calibrated_plan_speeds_up_the_builtin_model_with_close_output(name, steps):
    pipe = load_builtin(name)
    plan = calibrate(pipe, calibration_calls(name, 4, guidance=1.5), preset="fast", model_id=name)
    assert plan.target.model_id == name and plan.target.steps == steps
    assert plan.summary().ideal_speedup > 1.5
    full = generate(pipe, steps)
    with cached(pipe, plan) as cache:
        fast = generate(pipe, steps)
    assert cache.stats.steps_skipped > 0 and cache.stats.module_reuses > 0
    assert not np.array_equal(fast, full)
    assert metrics.psnr(fast, full) > PSNR_FLOOR[name]
    assert np.mean(metrics.classify(fast) == metrics.classify(full)) >= 0.9


# measured: digits-dit 31.1 dB, digits-flux 34.5 dB (4 trajectories, fast preset, guidance 1.5)
PSNR_FLOOR = {"digits-dit": 28.0, "digits-flux": 30.0}
