"""The plan heatmap of a calibration report: colours follow the plan, and the legend says so."""

from __future__ import annotations

import dataclasses

import numpy as np

from invardiff.plan import CachePlan, all_compute_plan
from workers.report import plan_heatmap

DARK, GREY, ORANGE = (25, 25, 25), (215, 215, 215), (245, 150, 40)
CELL, MARGIN = 6, 96


def _plan() -> CachePlan:
    plan = all_compute_plan("dit", steps=8, layers={"attn": 3, "mlp": 3})
    gate = np.zeros(8, dtype=bool)
    gate[[2, 5]] = True
    mlp = plan.modules["mlp"].copy()
    mlp[6, 1] = True  # step 6, layer 1 reuses its MLP output
    modules = {**plan.modules, "mlp": mlp}
    return dataclasses.replace(plan, step_gate=gate, modules=modules)


def _colour_at(image: np.ndarray, step: int, row: int) -> tuple[int, ...]:
    return tuple(int(v) for v in image[row * CELL + CELL // 2, MARGIN + step * CELL + CELL // 2])


def test_heatmap_colours_follow_the_plan() -> None:
    image = plan_heatmap(_plan())
    assert _colour_at(image, 2, 0) == ORANGE  # the gate row
    assert _colour_at(image, 0, 0) == DARK
    # panels are sorted by kind: attn (rows after the 2-row gate and a gap), then mlp
    attn_top = 2 * CELL + 4
    mlp_top = attn_top + 3 * CELL + 4

    def colour(top: int, layer: int, step: int) -> tuple[int, ...]:
        y = top + layer * CELL + CELL // 2
        return tuple(int(v) for v in image[y, MARGIN + step * CELL + CELL // 2])

    assert colour(attn_top, 0, 5) == ORANGE  # a reused step tints every panel
    assert colour(attn_top, 1, 6) == DARK
    assert colour(mlp_top, 1, 6) == GREY
    assert colour(mlp_top, 0, 6) == DARK


def test_legend_names_the_step_rule() -> None:
    hold = plan_heatmap(_plan())
    linear = plan_heatmap(dataclasses.replace(_plan(), step_reuse="linear"))
    for image in (hold, linear):
        legend = image[-3 * 14 :, :20].reshape(-1, 3)
        swatches = {tuple(int(v) for v in px) for px in legend}
        assert {DARK, GREY, ORANGE} <= swatches
    # the text differs ("held" vs "extrapolated"), the plan panels do not
    assert not np.array_equal(hold[-14:], linear[-14:])
    assert np.array_equal(hold[: -3 * 14], linear[: -3 * 14])
