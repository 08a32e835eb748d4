"""The plan's predicted cache memory against the bytes the runtime really holds, step by step."""

from __future__ import annotations

import numpy as np
import pytest

import invardiff
from benchmarks import memory
from benchmarks import peer_methods as pm
from benchmarks.memory import trace
from invardiff.cli import builtin_settings
from invardiff.models import load_builtin
from invardiff.schedules import every_k_plan


def _plans(pipe, setup: pm.ModelSetup) -> dict[str, invardiff.CachePlan]:
    """A seeded random plan mixing step and module reuse and, on FLUX (whose blocks return H as
    a slice of the joint text+image tensor), every 3rd step (H only)."""
    template = pm.template_plan(pipe, setup)
    rng = np.random.default_rng(7)
    gate = rng.random(setup.steps) < 0.3
    gate[0] = False
    modules = {
        kind: rng.random((setup.steps, n)) < 0.5 for kind, n in template.layer_counts().items()
    }
    for flags in modules.values():
        flags[0] = False
    plans = {"random": template.with_flags(gate, modules)}
    # extrapolating H and forecasting modules hold older outputs too (as many as the rules need)
    plans["random, quadratic-t, module linear"] = plans["random"].with_step_reuse("quadratic-t").with_module_reuse(
        "linear"
    )
    if setup.arch == "flux":
        plans["every 3rd"] = every_k_plan(template, 3)
    return plans


def held_bytes(cache: invardiff.PlanCache) -> int:
    """Bytes of the distinct storages of every tensor the cache holds (also the older outputs an
    extrapolating rule keeps, which benchmarks/memory.py's own count does not see)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache.held_tensors()}
    return sum(storages.values())


@pytest.mark.parametrize("name,arch", [("digits-dit", "dit"), ("digits-flux", "flux")])
def test_runtime_holds_exactly_the_predicted_bytes(name, arch, monkeypatch):
    monkeypatch.setattr(memory, "held_bytes", held_bytes)
    steps, guidance = builtin_settings(name)
    setup = pm.ModelSetup(name, arch, steps, guidance, [])
    pipe = load_builtin(name)
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 8]
    rows = 2 * len(labels)  # CFG batched into one call
    for label, plan in _plans(pipe, setup).items():
        with invardiff.cached(pipe, plan) as cache:
            record = trace(pipe, labels, steps, guidance, cache, heap=False)
        assert len(record["held"]) == steps
        # between steps: the summary's figure (storages counted: a kept slice would hold it all)
        assert max(record["held"]) == plan.summary(batch=rows).peak_cache_bytes, label
        # inside steps, module by module: the runtime frees what it recomputes before computing it
        assert max(record["held_modules"]) == plan.peak_cache_bytes_within_steps(batch=rows), label
        assert record["held"][-1] == 0  # nothing outlives the generation
    random_plan = _plans(pipe, setup)["random"]
    assert random_plan.peak_cache_bytes_within_steps() >= random_plan.summary().peak_cache_bytes > 0
