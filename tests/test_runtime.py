"""Cached execution on real diffusers models: exact module calls, bit-identity, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from plain_executor import PlainExecutor
from support import count_module_calls, official_plan_files

import invardiff
from invardiff import (
    PlanError,
    StepMatchError,
    all_compute_plan,
    cached,
    disable_cache,
    enable_cache,
)

# The reference plans are for DiT-XL/2 at 256x256 and FLUX.1-dev at 1024x1024 in bfloat16; these
# tests run them on small models of the same shape: a deliberate reuse.
REUSE = {"resolution", "guidance", "dtype"}
pytestmark = pytest.mark.filterwarnings("ignore::invardiff.checks.PlanMismatchWarning")


def dit_images(pipe, steps=50, guidance=1.5, seed=0, labels=(1, 7)):
    return pipe(
        class_labels=list(labels),
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


def flux_images(pipe, steps=28, seed=0, prompt="a b c"):
    return pipe(
        prompt=prompt,
        height=16,
        width=16,
        num_inference_steps=steps,
        guidance_scale=3.5,
        max_sequence_length=8,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


def expected_computations(plan) -> dict[tuple[str, int], int]:
    """From the plan's flags alone: how often each (kind, layer) must really run."""
    gate = np.asarray(plan.step_gate)
    flags = {k: np.asarray(v) for k, v in plan.modules.items()}
    if plan.arch == "flux":
        both = flags["attn"] & flags["context_attn"]
        flags["attn"] = flags["context_attn"] = both
    return {
        (kind, layer): int(np.sum(~gate & ~f[:, layer])) for kind, f in flags.items() for layer in range(f.shape[1])
    }


@pytest.fixture(scope="module")
def dit_xl_shaped(tiny):
    return tiny.tiny_dit_pipeline(num_layers=28, width=16)


@pytest.fixture(scope="module")
def flux_dev_shaped(tiny):
    return tiny.tiny_flux_pipeline(num_double=19, num_single=38, width=16)


@pytest.mark.parametrize("path", official_plan_files("dit"), ids=lambda p: p.name[:40])
def test_official_dit_plan_makes_exactly_the_planned_calls(dit_xl_shaped, path):
    plan = invardiff.load_plan(path)
    with cached(dit_xl_shaped, plan, allow_mismatch=REUSE), count_module_calls(dit_xl_shaped.transformer, "dit") as counts:
        images = dit_images(dit_xl_shaped)  # CFG batched: one call per step serves both halves
    assert dict(counts) == expected_computations(plan)
    with PlainExecutor(dit_xl_shaped.transformer, plan):  # the values reused are the right ones
        assert np.array_equal(images, dit_images(dit_xl_shaped))


@pytest.mark.parametrize("path", official_plan_files("flux"), ids=lambda p: p.name[:48])
def test_official_flux_plan_makes_exactly_the_planned_calls(flux_dev_shaped, path):
    plan = invardiff.load_plan(path)
    with cached(flux_dev_shaped, plan, allow_mismatch=REUSE), count_module_calls(flux_dev_shaped.transformer, "flux") as counts:
        images = flux_images(flux_dev_shaped)
    expected = expected_computations(plan)
    assert dict(counts) == expected
    with PlainExecutor(flux_dev_shaped.transformer, plan):  # the values reused are the right ones
        assert np.array_equal(images, flux_images(flux_dev_shaped))
    assert sum(expected.values()) < 0.5 * 28 * (4 * 19 + 2 * 38)  # the plans really skip work


def test_all_compute_plan_and_disabled_cache_are_bit_identical_dit(tiny):
    pipe = tiny.tiny_dit_pipeline(num_layers=3)
    baseline = dit_images(pipe, steps=12)
    plan = all_compute_plan("dit", 12, {"attn": 3, "mlp": 3})
    with cached(pipe, plan) as cache:
        assert np.array_equal(dit_images(pipe, steps=12), baseline)
        assert cache.stats.module_calls == 12 * 6 and cache.stats.module_reuses == 0
    assert np.array_equal(dit_images(pipe, steps=12), baseline)
    assert not hasattr(pipe.transformer, "_invardiff_cache")
    assert "set_timesteps" not in vars(pipe.scheduler)


def test_all_compute_plan_and_disabled_cache_are_bit_identical_flux(tiny):
    pipe = tiny.tiny_flux_pipeline(num_double=2, num_single=3)
    baseline = flux_images(pipe, steps=10)
    plan = all_compute_plan("flux", 10, {"attn": 2, "context_attn": 2, "ff": 2, "context_ff": 2,
                                         "single_attn": 3, "single_mlp": 3})  # fmt: skip
    enable_cache(pipe, plan)
    assert np.array_equal(flux_images(pipe, steps=10), baseline)
    disable_cache(pipe)
    assert np.array_equal(flux_images(pipe, steps=10), baseline)


def test_repeated_generations_with_a_plan_are_identical_and_differ_from_full(tiny, dit_xl_shaped):
    plan = invardiff.load_plan(official_plan_files("dit")[0])
    baseline = dit_images(dit_xl_shaped)
    with cached(dit_xl_shaped, plan, allow_mismatch=REUSE):
        first = dit_images(dit_xl_shaped)
        second = dit_images(dit_xl_shaped)
        other_seed = dit_images(dit_xl_shaped, seed=3)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, baseline)  # the plan really reused something
    assert not np.array_equal(first, other_seed)


def test_flux_generations_in_a_row_are_identical(flux_dev_shaped):
    plan = invardiff.load_plan(official_plan_files("flux")[1])
    with cached(flux_dev_shaped, plan, allow_mismatch=REUSE):
        assert np.array_equal(flux_images(flux_dev_shaped), flux_images(flux_dev_shaped))


def test_plan_that_does_not_fit_is_refused_with_what_differs(tiny):
    pipe = tiny.tiny_dit_pipeline(num_layers=4)
    plan = invardiff.load_plan(official_plan_files("dit")[0])
    with pytest.raises(PlanError, match="28 layers, model.transformer_blocks has 4"):
        enable_cache(pipe, plan)
    flux_plan = invardiff.load_plan(official_plan_files("flux")[0])
    with pytest.raises(PlanError, match="plan is for a flux transformer but the model is dit"):
        enable_cache(pipe, flux_plan)
    assert not hasattr(pipe.transformer, "_invardiff_cache")


def test_wrong_step_count_is_refused_at_generation_start(dit_xl_shaped):
    plan = invardiff.load_plan(official_plan_files("dit")[0])
    refused = pytest.raises(PlanError, match="runs 25 steps but the plan was calibrated for 50")
    with cached(dit_xl_shaped, plan, allow_mismatch=REUSE), refused:
        dit_images(dit_xl_shaped, steps=25)


def test_timestep_outside_the_schedule_is_an_error_not_a_guess(tiny):
    transformer = tiny.tiny_dit_transformer(num_layers=2)
    plan = all_compute_plan("dit", 4, {"attn": 2, "mlp": 2})
    latents = torch.randn(1, 4, 8, 8)
    with cached(transformer, plan, timesteps=[999, 749, 499, 249]):
        transformer(latents, timestep=torch.tensor([749]), class_labels=torch.tensor([1]))
        with pytest.raises(StepMatchError, match="timestep 500 is not in the plan's schedule"):
            transformer(latents, timestep=torch.tensor([500]), class_labels=torch.tensor([1]))
    with pytest.raises(PlanError, match="records no timestep schedule"):
        enable_cache(transformer, invardiff.load_plan(official_plan_files("dit")[0]).with_flags(
            np.zeros(50, bool), {"attn": np.zeros((50, 2), bool), "mlp": np.zeros((50, 2), bool)}))


def _plain_dit_loop(transformer, scheduler, steps, seed, uncond_transformer=None):
    """A hand-written DDIM loop with CFG as two transformer calls per step.

    ``uncond_transformer`` (default: the same one) makes the unconditional call.
    """
    scheduler.set_timesteps(steps)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    uncond_transformer = uncond_transformer or transformer
    with torch.no_grad():
        for t in scheduler.timesteps:
            timestep = t.reshape(1)
            cond = transformer(latents, timestep=timestep, class_labels=torch.tensor([3])).sample
            uncond = uncond_transformer(latents, timestep=timestep, class_labels=torch.tensor([1000])).sample
            guided = uncond + 1.5 * (cond - uncond)
            latents = scheduler.step(guided[:, :4], t, latents).prev_sample
    return latents


def test_plain_loop_with_cfg_as_two_calls_keeps_one_cache_per_branch(tiny):
    import copy

    from diffusers import DDIMScheduler

    transformer = tiny.tiny_dit_transformer(num_layers=3)
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    gate = np.zeros(10, bool)
    gate[[3, 6]] = True
    attn = np.zeros((10, 3), bool)
    attn[[2, 5, 8], 1] = True
    plan = invardiff.CachePlan(
        arch="dit",
        step_gate=gate,
        modules={"attn": attn, "mlp": attn.copy()},
        target=invardiff.PlanTarget(model_id="tiny", timesteps=tuple(float(t) for t in scheduler.timesteps)),
    )
    full = _plain_dit_loop(transformer, scheduler, 10, seed=1)
    with cached(transformer, plan) as cache:
        a = _plain_dit_loop(transformer, scheduler, 10, seed=1)
        assert cache.stats.steps_skipped == 2 * 2  # both branches skip steps 3 and 6
        b = _plain_dit_loop(transformer, scheduler, 10, seed=1)  # a new generation: state reset
    assert torch.equal(a, b)
    assert not torch.equal(a, full)
    # Independent check: each branch on its own model copy, each with its own single cache.
    twin = copy.deepcopy(transformer)
    with cached(transformer, plan), cached(twin, plan):
        separate = _plain_dit_loop(transformer, scheduler, 10, seed=1, uncond_transformer=twin)
    assert torch.equal(a, separate)


def test_only_tensors_reused_later_are_held(dit_xl_shaped):
    plan = invardiff.load_plan(official_plan_files("dit")[1])
    held = []
    with cached(dit_xl_shaped, plan, allow_mismatch=REUSE) as cache:
        original = cache._begin_call

        def spy(args, kwargs):
            if cache._branches:
                held.append(len(cache.current.modules) + (cache.current.hidden is not None))
            original(args, kwargs)

        cache._begin_call = spy
        dit_images(dit_xl_shaped)
    hold, hold_hidden = invardiff.plan.hold_after(plan)
    expected = [int(sum(h[i].sum() for h in hold.values()) + hold_hidden[i]) for i in range(plan.steps - 1)]
    assert held == expected
    assert max(held) < 2 * 28  # far fewer than every module output


def test_deferred_device_checks_give_the_same_generation(dit_xl_shaped):
    """The accelerator path (step from the scheduler, timestep checked on the device) on CPU."""
    plan = invardiff.load_plan(official_plan_files("dit")[0])
    with cached(dit_xl_shaped, plan, allow_mismatch=REUSE):
        by_value = dit_images(dit_xl_shaped)
    with cached(dit_xl_shaped, plan, allow_mismatch=REUSE) as cache:
        cache.tracker.defer_cpu = True
        deferred = dit_images(dit_xl_shaped)
        assert cache.tracker._pending is None  # read back at the last step
    assert np.array_equal(by_value, deferred)
