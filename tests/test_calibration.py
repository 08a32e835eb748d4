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
    print(f"tiny {arch} {preset}: {free_module_flags(plan, params.nonskip)} (free module flags, set)")
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


# ---- agreement on the trained built-in models, where many module flags are free -----------
def free_module_flags(plan, nonskip: float) -> tuple[int, int]:
    """(free flags, of which set): module flags on computed steps that no rule fixes.

    Fixed are: the warm-up prefix, the last step, skipped steps (all reused) and the step
    after a skipped one (all recomputed). Only free flags test the module thresholds.
    """
    gate = plan.step_gate
    warmup = max(1, int(nonskip * plan.steps))
    steps = [i for i in range(warmup, plan.steps - 1) if not gate[i] and not gate[i - 1]]
    free = sum(len(steps) * flags.shape[1] for flags in plan.modules.values())
    set_ = sum(int(flags[steps].sum()) for flags in plan.modules.values())
    return free, set_


def longest_unexecuted_run(plan) -> int:
    """Most consecutive steps any module goes without running (skipped steps included)."""
    flags = {k: v.copy() for k, v in plan.modules.items()}
    if plan.arch == "flux":  # the joint attention runs unless both halves are flagged
        flags["attn"] = flags["context_attn"] = flags["attn"] & flags["context_attn"]
    longest = 0
    for f in flags.values():
        idle = f | plan.step_gate[:, None]
        run = np.zeros(idle.shape[1], int)
        for row in idle:
            run = np.where(row, run + 1, 0)
            longest = max(longest, int(run.max()))
    return longest


class BuiltinCalibration:
    """One built-in model's calls, features and phase-1 statistics, shared by several settings."""

    def __init__(self, name: str, calls: list[dict]) -> None:
        from invardiff.models import load_builtin

        self.pipe = load_builtin(name)
        self.arch = "dit" if name.endswith("dit") else "flux"
        self.calls = calls
        self.features = [record_full_trajectory(self.pipe, self.arch, c) for c in calls]
        self._phase1: dict[str, list[TrajectoryStats]] = {}
        self._plans: dict[str, object] = {}

    def plan(self, params: CalibrationParams):
        """The engine's plan, through the fleet API (phase 1 shared per flag index)."""
        key = str(params.to_json())
        if key not in self._plans:
            self._plans[key] = self._calibrate(params)
        return self._plans[key]

    def _calibrate(self, params: CalibrationParams):
        run, t, steps = pipeline_runner(self.pipe), self.pipe.transformer, self.calls[0]["num_inference_steps"]
        if params.flag_index not in self._phase1:
            self._phase1[params.flag_index] = [trajectory_stats(t, run, c, i, steps, params)
                                               for i, c in enumerate(self.calls)]  # fmt: skip
        phase1 = self._phase1[params.flag_index]
        provisional = provisional_flags(merge_scores(phase1), params)
        phase2 = [trajectory_stats(t, run, c, i, steps, params, provisional=provisional)
                  for i, c in enumerate(self.calls)]  # fmt: skip
        return build_plan(self.pipe, self.calls, params, phase1, phase2)

    def reference(self, params: CalibrationParams):
        return reference_calibrator.calibrate(
            self.features, self.arch, params.nonskip, params.q_step, params.q, flag_index=params.flag_index,
            correct_flux_step_gate=params.correct_flux_step_gate, max_consecutive=params.max_consecutive,
        )


@pytest.fixture(scope="module")
def digits(request):
    from invardiff.cli import calibration_calls

    made = {}

    def get(name):
        if name not in made:
            made[name] = BuiltinCalibration(name, calibration_calls(name, 2, guidance=1.5))
        return made[name]

    return get


# Quantile settings that leave many module flags free: few skipped steps, module q near 0.5.
BUILTIN_SETTINGS = [
    ("digits-dit", {"q_step": 0.2, "q_attn": 0.5, "q_mlp": 0.5}),
    ("digits-dit", {"q_step": 0.2, "q_attn": 0.5, "q_mlp": 0.5, "flag_index": "aligned"}),
    ("digits-dit", {"q_step": 0.4, "q_attn": 0.6, "q_mlp": 0.6, "max_consecutive": 2}),
    ("digits-flux", {"q_step": 0.5, "q_attn": 0.5, "q_ff": 0.5, "q_context_ff": 0.4, "q_single_attn": 0.5,
                     "q_single_mlp": 0.5}),
    ("digits-flux", {"q_step": 0.5, "q_attn": 0.5, "q_ff": 0.5, "q_context_ff": 0.4, "q_single_attn": 0.5,
                     "q_single_mlp": 0.5, "correct_flux_step_gate": True}),
]  # fmt: skip


@pytest.mark.parametrize("name,settings", BUILTIN_SETTINGS, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={v}" for k, v in v.items() if not k.startswith("q_")) or "plain")
def test_builtin_model_calibration_matches_the_reference_calibrator_on_free_flags(digits, name, settings):
    model = digits(name)
    params = CalibrationParams.resolve(model.arch, "slow" if model.arch == "flux" else "fast", **settings)
    plan = model.plan(params)
    step, books = model.reference(params)
    assert np.array_equal(plan.step_gate, step.numpy())
    for kind, flags in books.items():
        assert np.array_equal(plan.modules[kind], flags.numpy()), kind
    free, set_ = free_module_flags(plan, params.nonskip)
    print(f"{name} {settings}: {free} free module flags compared, {set_} of them set; "
          f"{int(plan.step_gate.sum())} skipped steps")
    assert free >= 100 and 0.1 * free < set_ < 0.9 * free  # the module thresholds decide many flags
    if params.max_consecutive is not None:
        assert longest_unexecuted_run(plan) <= params.max_consecutive
    if params.correct_flux_step_gate or params.flag_index == "aligned":  # the option changes the plan
        default = model.plan(CalibrationParams.resolve(model.arch, "slow" if model.arch == "flux" else "fast",
                                                       **{k: v for k, v in settings.items()
                                                          if k not in ("correct_flux_step_gate", "flag_index")}))
        assert default.to_bytes() != plan.to_bytes()
