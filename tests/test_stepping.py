"""Finding the step of a transformer call from its timestep and the scheduler's progress."""

from __future__ import annotations

import pytest
import torch

from invardiff.stepping import StepMatchError, StepTracker, match_step, timestep_value

SCHEDULE = [1.0, 0.9877, 0.75, 0.5, 0.25]


def test_values_match_within_their_dtype_rounding_only():
    assert match_step(*timestep_value(torch.tensor([0.9877]).to(torch.bfloat16)), SCHEDULE) == 1
    assert match_step(*timestep_value(torch.tensor([750, 750])), [999, 750, 500]) == 1
    with pytest.raises(StepMatchError, match="not in the plan's schedule"):
        match_step(*timestep_value(torch.tensor([0.6])), SCHEDULE)
    with pytest.raises(StepMatchError, match="mixes different timesteps"):
        timestep_value(torch.tensor([0.75, 0.5]))


def test_without_a_scheduler_every_call_is_matched_by_value():
    tracker = StepTracker(SCHEDULE)
    assert [tracker.locate(torch.tensor([t])) for t in (1.0, 0.75, 0.75, 0.5)] == [0, 2, 2, 3]


def run_generation(tracker, timesteps, calls_per_step=1):
    tracker.start_generation()
    steps = []
    for t in timesteps:
        for _ in range(calls_per_step):
            steps.append(tracker.locate(torch.tensor([t])))
        tracker.advance()
    return steps


@pytest.mark.parametrize("deferred", [False, True])
def test_scheduler_progress_gives_the_step_and_the_timestep_is_checked(deferred):
    tracker = StepTracker(SCHEDULE, defer_cpu=deferred)
    assert run_generation(tracker, SCHEDULE) == [0, 1, 2, 3, 4]
    assert run_generation(tracker, SCHEDULE, calls_per_step=2) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    wrong = [1.0, 0.9877, 0.5, 0.5, 0.25]  # the loop and the scheduler disagree at step 2
    with pytest.raises(StepMatchError):
        run_generation(tracker, wrong)


def test_deferred_checks_read_the_device_once_per_generation():
    tracker = StepTracker(SCHEDULE, defer_cpu=True)
    tracker.start_generation()
    tracker.locate(torch.tensor([1.0]))
    tracker.advance()
    tracker.locate(torch.tensor([0.5]))  # wrong, but only queued on the device
    assert tracker._pending is not None
    with pytest.raises(StepMatchError, match="did not match the scheduler's step"):
        tracker.start_generation()  # the next generation (or the last step) reads it back
