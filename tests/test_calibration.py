"""Calibration end to end: agreement with the reference calibrator, determinism, fleet merge."""

from __future__ import annotations

import random

import numpy as np
import pytest
import reference_calibrator
import torch

from invardiff import CalibrationParams, TrajectoryStats, calibrate
from invardiff.calibration import (
    build_plan,
    merge_scores,
    pipeline_runner,
    provisional_flags,
    trajectory_stats,
)


def record_full_trajectory(pipe, arch, call):
    """Every module output and H of one run, captured by the test's own forward hooks."""
    t = pipe.transformer
    feats: dict[str, list[list[torch.Tensor]]] = {}

    def keep(key, layer, value):
        feats.setdefault(key, {}).setdefault(layer, []).append(value.detach().clone())

    def keep_joint(layer, output):
        keep("attn", layer, output[0])
        keep("context_attn", layer, output[1])

    handles = []
    if arch == "dit":
        for l, b in enumerate(t.transformer_blocks):
            handles.append(b.attn1.register_forward_hook(lambda m, a, o, l=l: keep("attn", l, o)))
            handles.append(b.ff.register_forward_hook(lambda m, a, o, l=l: keep("mlp", l, o)))
        handles.append(t.transformer_blocks[-1].register_forward_hook(lambda m, a, o: keep("hidden", 0, o)))
    else:
        for l, b in enumerate(t.transformer_blocks):
            handles.append(b.attn.register_forward_hook(lambda m, a, o, l=l: keep_joint(l, o)))
            handles.append(b.ff.register_forward_hook(lambda m, a, o, l=l: keep("ff", l, o)))
            handles.append(b.ff_context.register_forward_hook(lambda m, a, o, l=l: keep("context_ff", l, o)))
        for l, b in enumerate(t.single_transformer_blocks):
            handles.append(b.attn.register_forward_hook(lambda m, a, o, l=l: keep("single_attn", l, o)))
            handles.append(b.act_mlp.register_forward_hook(lambda m, a, o, l=l: keep("single_mlp", l, o)))
        handles.append(t.single_transformer_blocks[-1].register_forward_hook(lambda m, a, o: keep("hidden", 0, o[1])))
    try:
        pipeline_runner(pipe)(call, torch.Generator().manual_seed(call["seed"]))
    finally:
        for h in handles:
            h.remove()
    return {key: [layers[l] for l in sorted(layers)] for key, layers in feats.items()}


def assert_matches_reference(pipe, arch, calls, preset):
    plan = calibrate(pipe, calls, preset=preset, mode="reference")
    params = CalibrationParams.resolve(arch, preset)
    trajectories = [record_full_trajectory(pipe, arch, c) for c in calls]
    step, books = reference_calibrator.calibrate(trajectories, arch, params.nonskip, params.q_step, params.q)
    assert np.array_equal(plan.step_gate, step.numpy())
    for kind, flags in books.items():
        assert np.array_equal(plan.modules[kind], flags.numpy()), kind
    return plan


@pytest.fixture(scope="module")
def dit_pipe(tiny):
    return tiny.tiny_dit_pipeline(num_layers=4)


@pytest.fixture(scope="module")
def flux_pipe(tiny):
    return tiny.tiny_flux_pipeline(num_double=2, num_single=3)


DIT_CALLS = [{"class_labels": [c], "num_inference_steps": 20, "seed": s} for c, s in [(3, 0), (5, 1), (8, 2), (1, 3)]]
FLUX_CALLS = [
    {"prompt": p, "height": 16, "width": 16, "num_inference_steps": 14, "guidance_scale": 3.5,
     "max_sequence_length": 8, "seed": 42}
    for p in ("a cat", "bed", "zebra")
]  # fmt: skip


@pytest.mark.parametrize("preset", ["fast", "slow"])
def test_dit_calibration_matches_the_reference_calibrator_flag_for_flag(dit_pipe, preset):
    plan = assert_matches_reference(dit_pipe, "dit", DIT_CALLS, preset)
    assert plan.step_gate.any() and plan.modules["attn"].any()  # a non-trivial plan


@pytest.mark.parametrize("preset", ["fast", "slow"])
def test_flux_calibration_matches_the_reference_calibrator_flag_for_flag(flux_pipe, preset):
    plan = assert_matches_reference(flux_pipe, "flux", FLUX_CALLS, preset)
    assert plan.step_gate.any()
    if preset == "slow":  # q_context_ff = 0: context_ff reused only on skipped steps
        assert np.array_equal(plan.modules["context_ff"].any(axis=1), plan.step_gate)


def test_same_calibration_twice_gives_the_same_plan_bytes(dit_pipe):
    first = calibrate(dit_pipe, DIT_CALLS[:2])
    second = calibrate(dit_pipe, DIT_CALLS[:2])
    assert first.to_bytes() == second.to_bytes()
    assert first.target.steps == 20 and len(first.target.timesteps) == 20
    assert first.target.scheduler == "DDIMScheduler" and first.target.pipeline == "DiTPipeline"
    assert first.calibration["trajectories"] == 2 and first.calibration["calls"][1]["seed"] == 1


def test_reference_rules_are_the_default_without_a_target(dit_pipe):
    assert calibrate(dit_pipe, DIT_CALLS[:2], mode="reference") == calibrate(dit_pipe, DIT_CALLS[:2])


def test_statistics_serialize_and_merge_in_any_order(dit_pipe):
    params = CalibrationParams.resolve("dit", "fast")
    run = pipeline_runner(dit_pipe)
    t = dit_pipe.transformer
    phase1 = [trajectory_stats(t, run, c, i, 20, params) for i, c in enumerate(DIT_CALLS)]
    restored = [TrajectoryStats.from_bytes(s.to_bytes()) for s in phase1]
    assert all(torch.equal(a.scores["attn"], b.scores["attn"]) for a, b in zip(phase1, restored))
    shuffled = restored[:]
    random.Random(0).shuffle(shuffled)
    provisional = provisional_flags(merge_scores(shuffled), params)
    phase2 = [trajectory_stats(t, run, c, i, 20, params, provisional=provisional) for i, c in enumerate(DIT_CALLS)]
    fleet_plan = build_plan(dit_pipe, DIT_CALLS, params, shuffled, phase2[::-1])
    assert fleet_plan.to_bytes() == calibrate(dit_pipe, DIT_CALLS).to_bytes()


def test_calibration_on_a_plain_loop(tiny):
    from diffusers import DDIMScheduler

    transformer = tiny.tiny_dit_transformer(num_layers=3)
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False)

    def loop(call, generator):
        scheduler.set_timesteps(call["num_inference_steps"])
        x = torch.randn(1, 4, 8, 8, generator=generator)
        with torch.no_grad():
            for t in scheduler.timesteps:
                eps = transformer(x, timestep=t.reshape(1), class_labels=torch.tensor(call["class_labels"])).sample
                x = scheduler.step(eps[:, :4], t, x).prev_sample

    calls = [{"class_labels": [c], "num_inference_steps": 16, "seed": c} for c in (2, 4, 6)]
    plan = calibrate(transformer, calls, runner=loop)
    assert plan.steps == 16 and plan.target.timesteps == tuple(float(t) for t in scheduler.timesteps)
    assert plan.summary().ideal_speedup > 1.0


def test_bad_calibration_input_is_refused(dit_pipe):
    with pytest.raises(ValueError, match="unknown preset 'turbo'"):
        calibrate(dit_pipe, DIT_CALLS, preset="turbo")
    with pytest.raises(ValueError, match="unknown calibration parameter"):
        calibrate(dit_pipe, DIT_CALLS, q_bogus=0.3)
    with pytest.raises(ValueError, match="q_attn must be within"):
        calibrate(dit_pipe, DIT_CALLS, q_attn=1.5)
    with pytest.raises(ValueError, match="disagree on 'num_inference_steps'"):
        calibrate(dit_pipe, [DIT_CALLS[0], {**DIT_CALLS[1], "num_inference_steps": 10}])
    with pytest.raises(ValueError, match="has no 'seed'"):
        calibrate(dit_pipe, [{"class_labels": [1], "num_inference_steps": 10}])
