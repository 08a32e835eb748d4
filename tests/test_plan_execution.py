"""The runtime against an independent plain executor, bit for bit, on hand-made plans:
FLUX joint attention with differing halves, CFG as two calls, img2img mid-schedule, and
generations after a failed or interrupted one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from plain_executor import PlainExecutor
from support import count_module_calls
from test_runtime import expected_computations

from invardiff import CachePlan, PlanTarget, cached
from invardiff.architectures import module_kinds

STEPS = 10


def random_plan(arch: str, layers: dict[str, int], seed: int, p: float = 0.35, gate_p: float = 0.2,
                timesteps=None) -> CachePlan:  # fmt: skip
    """Flags drawn at random (never at step 0): reuse right after a skip, lone flags, and for
    FLUX many places where ``attn`` and ``context_attn`` differ."""
    rng = np.random.default_rng(seed)
    gate = rng.random(STEPS) < gate_p
    gate[0] = False
    modules = {}
    for kind in module_kinds(arch):
        flags = rng.random((STEPS, layers[kind])) < p
        flags[0] = False
        modules[kind] = flags
    return CachePlan(arch=arch, step_gate=gate, modules=modules,
                     target=PlanTarget(model_id="tiny", timesteps=timesteps))  # fmt: skip


def flux_layers(double: int, single: int) -> dict[str, int]:
    return {"attn": double, "context_attn": double, "ff": double, "context_ff": double,
            "single_attn": single, "single_mlp": single}  # fmt: skip


def half_flagged(plan: CachePlan) -> int:
    """Computed steps (after step 0) where exactly one half of the joint attention is flagged."""
    one = plan.modules["attn"] ^ plan.modules["context_attn"]
    return int(one[1:][~plan.step_gate[1:]].sum())


@pytest.fixture(scope="module")
def flux_pipe(tiny):
    return tiny.tiny_flux_pipeline(num_double=2, num_single=3)


def flux_call(pipe, seed=0, **kwargs):
    args = {"prompt": "a b", "height": 16, "width": 16, "num_inference_steps": STEPS, "guidance_scale": 3.5,
            "max_sequence_length": 8, "generator": torch.Generator().manual_seed(seed), "output_type": "np"}
    return pipe(**{**args, **kwargs}).images


def one_half_mostly(plan: CachePlan, half: str, seed: int) -> CachePlan:
    """``plan`` with the other half of the joint attention flagged at only ~1/3 of ``half``'s flags."""
    other = "context_attn" if half == "attn" else "attn"
    keep = np.random.default_rng(seed).random(plan.modules[half].shape) < 0.33
    return plan.with_flags(plan.step_gate, {**plan.modules, other: plan.modules[half] & keep})


@pytest.mark.parametrize("half,seed", [("attn", 1), ("context_attn", 2)])
def test_flux_plans_with_differing_attention_halves_match_the_plain_executor(flux_pipe, half, seed):
    plan = one_half_mostly(random_plan("flux", flux_layers(2, 3), seed, p=0.5), half, seed)
    assert half_flagged(plan) >= 4  # the joint rule decides real cases
    with cached(flux_pipe, plan), count_module_calls(flux_pipe.transformer, "flux") as counts:
        images = flux_call(flux_pipe)
    assert dict(counts) == expected_computations(plan)
    with PlainExecutor(flux_pipe.transformer, plan) as plain:
        assert np.array_equal(images, flux_call(flux_pipe))
    assert any(kind == "joint_attn" for _, kind, _ in plain.reused)


def test_flux_true_cfg_two_calls_per_step_match_the_plain_executor(flux_pipe):
    plan = random_plan("flux", flux_layers(2, 3), seed=3)
    call = {"negative_prompt": "z", "true_cfg_scale": 2.0}
    with cached(flux_pipe, plan) as cache:
        images = flux_call(flux_pipe, **call)
        assert len(cache._branches) == 2
    with PlainExecutor(flux_pipe.transformer, plan, calls_per_step=2):
        assert np.array_equal(images, flux_call(flux_pipe, **call))


def test_dit_plans_match_the_plain_executor(tiny):
    pipe = tiny.tiny_dit_pipeline(num_layers=3)
    plan = random_plan("dit", {"attn": 3, "mlp": 3}, seed=4, p=0.45, gate_p=0.3)

    def generate():
        return pipe(class_labels=[2, 5], num_inference_steps=STEPS, guidance_scale=1.5,
                    generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip

    with cached(pipe, plan):
        images = generate()
    with PlainExecutor(pipe.transformer, plan) as plain:
        assert np.array_equal(images, generate())
    assert len(plain.reused) > 10


# ---- img2img and generations after a failed one -------------------------------------------
class Interrupted(Exception):
    pass


def stop_at(step: int):
    def callback(pipe, i, t, kwargs):
        if i == step:
            raise Interrupted
        return kwargs

    return callback


def test_img2img_starts_mid_schedule_clean_after_an_interrupted_generation(flux_pipe):
    from diffusers import FluxImg2ImgPipeline

    pipe = FluxImg2ImgPipeline(**flux_pipe.components)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    plan = random_plan("flux", flux_layers(2, 3), seed=5, p=0.5, gate_p=0.3)
    first = STEPS - int(STEPS * 0.6)  # strength 0.6 runs the last 6 of 10 steps
    assert plan.step_gate[first] or plan.modules["ff"][first].any()  # reuse at once if anything is cached

    def img2img(strength, **kwargs):
        return flux_call(pipe, image=image, strength=strength, **kwargs)

    with cached(pipe, plan) as cache:
        with pytest.raises(Interrupted):  # another generation, stopped at step 7 with tensors held
            img2img(1.0, prompt="z y", seed=3, callback_on_step_end=stop_at(7))
        images = img2img(0.6)
        assert pipe.scheduler.begin_index == first
    with PlainExecutor(pipe.transformer, plan, first_step=first) as plain:
        assert np.array_equal(images, img2img(0.6))
    assert plain.steps_run == STEPS - first
    assert cache.stats.steps_computed + cache.stats.steps_skipped == STEPS - first  # stats: this generation's


def plain_dit_loop(transformer, timesteps, label, seed, fail_at=None):
    """A DDIM-free plain loop (x <- x - 0.1 eps); ``fail_at``: raise inside the transformer there."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    handle = None
    if fail_at is not None:
        calls = []

        def fail(module, args, output):
            calls.append(1)
            if len(calls) > fail_at:
                raise Interrupted

        handle = transformer.transformer_blocks[1].register_forward_hook(fail)
    try:
        with torch.no_grad():
            for t in timesteps:
                eps = transformer(x, timestep=torch.tensor([t]), class_labels=torch.tensor([label])).sample
                x = x - 0.1 * eps[:, :4]
    finally:
        if handle is not None:
            handle.remove()
    return x


@pytest.mark.parametrize("fail_at", [0, 5])
def test_bare_transformer_generation_after_a_failed_one_starts_clean(tiny, fail_at):
    transformer = tiny.tiny_dit_transformer(num_layers=3)
    timesteps = [float(t) for t in range(900, -1, -100)]
    plan = random_plan("dit", {"attn": 3, "mlp": 3}, seed=6, p=0.5, gate_p=0.2, timesteps=tuple(timesteps))
    reuse_at_1 = {kind: np.vstack([flags[:1], np.ones_like(flags[1:2]), flags[2:]]) for kind, flags in plan.modules.items()}
    plan = plan.with_flags(plan.step_gate, reuse_at_1)  # step 1 reuses everything cached at step 0
    with cached(transformer, plan):
        with pytest.raises(Interrupted):  # fails inside the transformer, at step `fail_at`
            plain_dit_loop(transformer, timesteps, label=9, seed=5, fail_at=fail_at)
        after_failure = plain_dit_loop(transformer, timesteps, label=3, seed=1)
    with PlainExecutor(transformer, plan):
        assert torch.equal(after_failure, plain_dit_loop(transformer, timesteps, label=3, seed=1))


def test_pipeline_generation_after_an_exception_mid_generation_starts_clean(tiny):
    pipe = tiny.tiny_dit_pipeline(num_layers=3)
    plan = random_plan("dit", {"attn": 3, "mlp": 3}, seed=7, p=0.5, gate_p=0.3)

    def generate(seed, labels=(2,)):
        return pipe(class_labels=list(labels), num_inference_steps=STEPS, guidance_scale=1.5,
                    generator=torch.Generator().manual_seed(seed), output_type="np").images  # fmt: skip

    with cached(pipe, plan) as cache:
        cache.tracker.defer_cpu = True  # the accelerator path: timesteps checked on the device
        calls = []

        def fail(module, args, output):
            calls.append(1)
            if len(calls) == 6:
                raise Interrupted

        handle = pipe.transformer.transformer_blocks[2].register_forward_hook(fail)
        with pytest.raises(Interrupted):
            generate(seed=9, labels=(7,))
        handle.remove()
        images = generate(seed=0)
        assert (cache.stats.steps_computed, cache.stats.steps_skipped) == (STEPS - int(plan.step_gate.sum()),
                                                                          int(plan.step_gate.sum()))
    with PlainExecutor(pipe.transformer, plan):
        assert np.array_equal(images, generate(seed=0))
