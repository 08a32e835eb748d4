"""Test support for the budget search: a FLUX-shaped template plan and synthetic measures."""

from __future__ import annotations

import invardiff

FLUX_LAYERS = {"attn": 2, "context_attn": 2, "ff": 2, "context_ff": 2, "single_attn": 6, "single_mlp": 6}
STEPS = 28


def flux_template(steps: int = STEPS):
    """An all-compute FLUX-shaped plan of ``steps`` steps (what the search fills)."""
    return invardiff.all_compute_plan("flux", steps, FLUX_LAYERS, geometry=invardiff.Geometry(64, 64, 4))


def per_plan(score):
    """A measure (``invardiff.certify.Measure``) from a per-plan score (a figure or per-sample
    figures), calling ``done`` once per plan."""

    def measure(plans, done):
        values = []
        for plan in plans:
            values.append(score(plan))
            done()
        return values

    return measure
