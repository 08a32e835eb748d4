"""The calibration math on hand-made arrays."""

from __future__ import annotations

import pytest
import torch

from invardiff.scores import (
    ChangeTracker,
    CorrectionTracker,
    cap_runs,
    mask_steps,
    recompute_after_skip,
    threshold,
    warmup_steps,
)


def sequence(displacements):
    """Scalars whose step-to-step L1 changes are exactly ``displacements``."""
    values = [torch.tensor([0.0])]
    for d in displacements:
        values.append(values[-1] + d)
    return values


def test_change_scores_compare_the_next_change_with_the_last():
    tracker = ChangeTracker(steps=5)
    for i, z in enumerate(sequence([4.0, 2.0, 1.0, 3.0])):
        tracker.update(i, z)
    # r[i] = D[i+1] / D[i] for i = 1..3; ends stay 1.0
    assert torch.allclose(tracker.scores, torch.tensor([1.0, 0.5, 0.5, 3.0, 1.0]))


def test_aligned_scores_sit_on_the_step_they_describe():
    tracker = ChangeTracker(steps=5, flag_index="aligned")
    for i, z in enumerate(sequence([4.0, 2.0, 1.0, 3.0])):
        tracker.update(i, z)
    assert torch.allclose(tracker.scores, torch.tensor([1.0, 1.0, 0.5, 0.5, 3.0]))


def test_correction_freezes_the_reference_inside_a_run_after_one_advance():
    provisional = torch.tensor([False, True, True, True, False, False])
    tracker = CorrectionTracker(provisional)
    for i, z in enumerate(sequence([1.0, 1.0, 1.0, 1.0, 1.0])):
        tracker.update(i, z)
    # k=2: |Z2-Z1|/|Z1-Z0| = 1 (opens the run: advance once); k=3: |Z3-Z2|/1 = 1, frozen;
    # k=4: |Z4-Z2|/1 = 2 (still frozen); k=5: C1[4] false -> |Z5-Z2| / 1 = 3.
    assert torch.allclose(tracker.scores, torch.tensor([1.0, 1.0, 1.0, 2.0, 3.0, 1.0]))


def test_correction_without_provisional_reuse_equals_phase_one():
    values = sequence([4.0, 2.0, 1.0, 3.0, 0.5])
    plain, corrected = ChangeTracker(6), CorrectionTracker(torch.zeros(6, dtype=torch.bool))
    for i, z in enumerate(values):
        plain.update(i, z)
        corrected.update(i, z)
    assert torch.allclose(plain.scores, corrected.scores)


def test_threshold_pools_interior_rows_of_all_layers_and_is_strict():
    scores = torch.tensor([[0.0, 0.0], [0.1, 0.5], [0.2, 0.6], [0.3, 0.7], [0.0, 0.0]])
    # interior values 0.1 0.2 0.3 0.5 0.6 0.7: the 0.4-quantile is 0.3 (linear interpolation)
    flags = threshold(scores, 0.4)
    assert flags.tolist() == [[False, False], [True, False], [True, False], [False, False], [False, False]]
    assert not threshold(scores, 0.0).any()  # q = 0 flags nothing (strict <)
    with pytest.raises(ValueError):
        threshold(scores, 1.2)


@pytest.mark.parametrize("nonskip,steps,expected", [(0.0, 50, 1), (0.1, 28, 2), (0.15, 28, 4), (0.22, 28, 6)])
def test_warmup_truncates_like_the_reference(nonskip, steps, expected):
    assert warmup_steps(nonskip, steps) == expected


def test_masks_and_recompute_after_a_skipped_step():
    gate = mask_steps(torch.tensor([True, True, True, False, True, True, False, True]), 2)
    assert gate.tolist() == [False, False, True, False, True, True, False, False]
    modules = recompute_after_skip(gate, {"attn": torch.tensor([[False, True]] * 8)})
    rows = modules["attn"].tolist()
    assert rows[2] == [True, True] and rows[3] == [False, False]  # skipped, then all recomputed
    assert rows[4] == rows[5] == [True, True] and rows[6] == [False, False]
    assert rows[7] == [False, True]


def test_cap_runs_limits_consecutive_reuse_per_column():
    flags = torch.tensor([[True, False]] * 7)
    assert cap_runs(flags, 2)[:, 0].tolist() == [True, True, False, True, True, False, True]
    assert torch.equal(cap_runs(flags, None), flags)


def test_cap_runs_counts_skipped_steps_and_cuts_at_a_computed_one():
    skipped = torch.tensor([0, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    flags = torch.tensor([[0, 1, 1, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1, 1]], dtype=torch.bool).T
    capped = cap_runs(flags, 2, skipped=skipped)
    assert capped[:, 0].tolist() == [False, False, True, True, False, False, True]
    assert capped[:, 1].tolist() == [False, False, True, False, False, True, True]
