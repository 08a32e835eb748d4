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


RESULT = {
    "model": "digits-flux",
    "version": 3,
    "sha256": "ab" * 32,
    "metrics": {"ideal_speedup": 2.8, "measured_speedup": 2.54, "psnr_db": 51.2, "ssim": 0.9999,
                "validation": {"samples": 4, "device": "cpu"}},
}  # fmt: skip


def test_validation_figure_has_a_title_row_labels_and_the_figures() -> None:
    from workers.report import LABEL_WIDTH, figures, validation_figure, validation_grid

    rng = np.random.default_rng(0)
    full, cached = rng.random((4, 16, 16, 1)), rng.random((4, 16, 16, 1))
    grid = validation_grid(full, cached)
    image = validation_figure(full, cached, RESULT)
    header = image.shape[0] - grid.shape[0]
    assert header >= 4 * 14  # a title and three lines of figures
    assert np.array_equal(image[header:, LABEL_WIDTH : LABEL_WIDTH + grid.shape[1], 0], grid)
    assert (image[:header] < 128).any() and (image[header:, :LABEL_WIDTH] < 128).any()
    lines = figures(RESULT)
    assert lines[0].startswith("digits-flux v3") and "2.54x measured" in lines[1]
    assert "2.80x ideal" in lines[1] and "PSNR 51.2 dB" in lines[1] and "4 held-out samples" in lines[2]
    other = validation_figure(full, cached, {**RESULT, "version": 4})
    assert not np.array_equal(image[:header], other[:header])  # the figures are drawn
    assert np.array_equal(image[header:], other[header:])


def test_plan_png_is_headed_with_the_model_version_and_figures() -> None:
    from workers.report import figures, with_header

    heatmap = plan_heatmap(_plan())
    image = with_header(heatmap, ["cache plan", *figures(RESULT)])
    top = image.shape[0] - heatmap.shape[0]
    assert np.array_equal(image[top:, : heatmap.shape[1]], heatmap)
    assert (image[:top] < 128).any()
    assert figures({"model": "m", "version": 1, "sha256": "c" * 64,
                    "metrics": {"ideal_speedup": 2.0}})[1] == "ideal speed-up 2.00x"  # fmt: skip
