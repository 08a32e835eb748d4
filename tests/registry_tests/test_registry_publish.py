"""Publishing keeps a calibrated plan's bytes: the engine's target is the canonical one."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from invardiff import CachePlan, calibrate
from invardiff.models import load_builtin


@pytest.fixture(scope="module")
def calibrated() -> CachePlan:
    """A real calibration of digits-dit (2 trajectories of 8 steps)."""
    pipe = load_builtin("digits-dit")
    pipe.set_progress_bar_config(disable=True)
    calls = [
        {"class_labels": [i], "num_inference_steps": 8, "guidance_scale": 1.25, "seed": 1000 + i}
        for i in range(2)
    ]
    return calibrate(pipe, calls, model_id="digits-dit")


def test_publishing_a_calibrated_plan_keeps_its_sha256(registry, calibrated: CachePlan) -> None:
    # A caller's float settings (``height=16.0``, ``guidance_scale=-0.0``) land in the target.
    floats = replace(calibrated.target, height=16.0, width=16.0, guidance=-0.0)
    for plan in (calibrated, replace(calibrated, target=floats)):
        data = plan.to_bytes()
        published = registry.publish_bytes(data, "calibrated.plan.json", "digits-dit", None)
        assert published.version.sha256 == hashlib.sha256(data).hexdigest() == plan.sha256
        assert registry.store.get(published.version.object_key) == data
