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


def dit_call(pipe, labels=(2, 5), seed=0):
    return pipe(class_labels=list(labels), num_inference_steps=STEPS, guidance_scale=1.5,
                generator=torch.Generator().manual_seed(seed), output_type="np").images  # fmt: skip


def same_as_plain_dit(pipe, plan: CachePlan) -> tuple[np.ndarray, PlainExecutor]:
    """The runtime's images, asserted bit for bit equal to the plain executor's, and the executor."""
    with cached(pipe, plan):
        images = dit_call(pipe)
    with PlainExecutor(pipe.transformer, plan) as plain:
        assert np.array_equal(images, dit_call(pipe))
    return images, plain


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
    _, plain = same_as_plain_dit(pipe, plan)
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


# ---- step_reuse="linear": H of a skipped step extrapolated from the last two computed ----
# computed 0, 1, 3, 6, 9; reused 2 (extrapolated from 0 and 1), 4-5 (from 1 and 3), 7-8
LINEAR_GATE = np.array([0, 0, 1, 0, 1, 1, 0, 1, 1, 0], bool)


def linear_plan(arch: str, layers: dict[str, int], seed: int, timesteps=None) -> CachePlan:
    plan = random_plan(arch, layers, seed, p=0.3, timesteps=timesteps)
    return plan.with_flags(LINEAR_GATE, plan.modules).with_step_reuse("linear")


def test_flux_linear_step_reuse_matches_the_plain_executor_per_cfg_branch(flux_pipe):
    plan = linear_plan("flux", flux_layers(2, 3), seed=8)
    call = {"negative_prompt": "z", "true_cfg_scale": 2.0}
    with cached(flux_pipe, plan) as cache:
        images = flux_call(flux_pipe, **call)
        assert cache.stats.steps_skipped == 2 * int(LINEAR_GATE.sum())
    with PlainExecutor(flux_pipe.transformer, plan, calls_per_step=2):
        assert np.array_equal(images, flux_call(flux_pipe, **call))
    with cached(flux_pipe, plan.with_step_reuse("hold")):
        assert not np.allclose(images, flux_call(flux_pipe, **call), atol=1e-4)  # the rule decides the output


def test_dit_linear_step_reuse_matches_the_plain_executor(tiny):
    pipe = tiny.tiny_dit_pipeline(num_layers=3)
    plan = linear_plan("dit", {"attn": 3, "mlp": 3}, seed=9)

    def generate():
        return dit_call(pipe)

    with cached(pipe, plan):
        images = generate()
    with PlainExecutor(pipe.transformer, plan):
        assert np.array_equal(images, generate())
    with PlainExecutor(pipe.transformer, plan.with_step_reuse("hold")):
        assert not np.allclose(images, generate(), atol=1e-4)


def held_counts(cache) -> tuple[int, dict]:
    """(H held, outputs held per module key) by the current branch of a live cache."""
    branch = cache.current
    hidden = (branch.hidden is not None) + len(branch.history.get("hidden", []))
    return hidden, {key: 1 + len(branch.history.get(key, [])) for key in branch.modules}


def spy_held(cache, held: list) -> None:
    """Record :func:`held_counts` before each transformer call after the first."""
    original = cache._begin_call

    def spy(args, kwargs):
        if cache._branches:
            held.append(held_counts(cache))
        original(args, kwargs)

    cache._begin_call = spy


def expected_held(plan: CachePlan) -> list[tuple[int, dict]]:
    """What the plan says is held after each step but the last (:func:`hidden_held`, :func:`module_held`)."""
    from invardiff.plan import hidden_held, module_held

    hidden = hidden_held(plan).sum(axis=0)
    modules = {kind: flags.sum(axis=0) for kind, flags in module_held(plan).items()}
    return [(int(hidden[i]), {(kind, int(layer)): int(counts[i, layer]) for kind, counts in modules.items()
                              for layer in np.flatnonzero(counts[i])})
            for i in range(plan.steps - 1)]  # fmt: skip


@pytest.mark.parametrize("step_reuse,module_reuse", [("linear", "hold"), ("quadratic-t", "hold"),
                                                     ("linear", "linear"), ("hold", "linear-t")])  # fmt: skip
def test_the_runtime_holds_exactly_what_the_plan_says(tiny, step_reuse, module_reuse):
    pipe = tiny.tiny_dit_pipeline(num_layers=2)
    plan = linear_plan("dit", {"attn": 2, "mlp": 2}, seed=10, timesteps=dit_schedule(pipe))
    plan = plan.with_step_reuse(step_reuse).with_module_reuse(module_reuse)
    held: list = []
    with cached(pipe, plan) as cache:
        spy_held(cache, held)
        pipe(class_labels=[1], num_inference_steps=STEPS, guidance_scale=1.5, output_type="np")
    assert held == expected_held(plan)
    assert any(hidden >= 2 for hidden, _ in held) == (step_reuse != "hold")
    assert any(n == 2 for _, modules in held for n in modules.values()) == (module_reuse != "hold")
    assert any(hidden == 3 for hidden, _ in held) == (step_reuse == "quadratic-t")


# ---- extrapolation in the schedule's own variable, and module forecasting -----------------
def dit_schedule(pipe) -> tuple[float, ...]:
    pipe.scheduler.set_timesteps(STEPS)
    return tuple(float(t) for t in pipe.scheduler.timesteps)


@pytest.fixture(scope="module")
def shifted_flux_pipe(tiny):
    """The tiny FLUX pipeline on FLUX.1-dev's scheduler settings: a non-uniform schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny.tiny_flux_pipeline(num_double=2, num_single=3)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                     max_shift=1.15, base_image_seq_len=256,
                                                     max_image_seq_len=4096)  # fmt: skip
    return pipe


def called_schedule(pipe, call) -> tuple[float, ...]:
    """The timesteps the transformer is called with, as the runtime reads the scheduler's."""
    call()
    return tuple((np.asarray(pipe.scheduler.timesteps.double()) * 1e-3).tolist())


@pytest.mark.parametrize("step_reuse,module_reuse", [("linear-t", "hold"), ("quadratic-t", "hold"),
                                                     ("hold", "linear"), ("quadratic-t", "linear-t")])  # fmt: skip
def test_flux_timestep_rules_and_module_forecasts_match_the_plain_executor(shifted_flux_pipe, step_reuse,
                                                                           module_reuse):  # fmt: skip
    pipe = shifted_flux_pipe
    call = {"negative_prompt": "z", "true_cfg_scale": 2.0}
    timesteps = called_schedule(pipe, lambda: flux_call(pipe, num_inference_steps=STEPS))
    assert np.ptp(np.diff(timesteps)) > 0.01  # really non-uniform
    plan = linear_plan("flux", flux_layers(2, 3), seed=8, timesteps=timesteps)
    plan = plan.with_step_reuse(step_reuse).with_module_reuse(module_reuse)
    with cached(pipe, plan):
        images = flux_call(pipe, **call)
    with PlainExecutor(pipe.transformer, plan, calls_per_step=2) as plain:
        assert np.array_equal(images, flux_call(pipe, **call))
    assert any(kind == "joint_attn" for _, kind, _ in plain.reused)
    # each part of the rule decides the output: in step index, or holding, it differs
    other = plan.with_step_reuse(step_reuse.replace("-t", "").replace("quadratic", "linear"))
    other = other.with_module_reuse("hold" if module_reuse == "linear-t" else module_reuse.replace("-t", ""))
    if other != plan:
        with cached(pipe, other):
            assert not np.allclose(images, flux_call(pipe, **call), atol=1e-5)
    if module_reuse != "hold":
        with cached(pipe, plan.with_module_reuse("hold")):
            assert not np.allclose(images, flux_call(pipe, **call), atol=1e-5)


@pytest.mark.parametrize("step_reuse,module_reuse", [("quadratic-t", "hold"), ("linear", "linear"),
                                                     ("hold", "linear-t")])  # fmt: skip
def test_dit_timestep_rules_and_module_forecasts_match_the_plain_executor(tiny, step_reuse, module_reuse):
    pipe = tiny.tiny_dit_pipeline(num_layers=3)
    plan = linear_plan("dit", {"attn": 3, "mlp": 3}, seed=9, timesteps=dit_schedule(pipe))
    plan = plan.with_step_reuse(step_reuse).with_module_reuse(module_reuse)
    images, plain = same_as_plain_dit(pipe, plan)
    assert plain.reused
    with cached(pipe, plan.with_step_reuse("hold").with_module_reuse("hold")):
        assert not np.allclose(images, dit_call(pipe), atol=1e-4)


def test_on_a_uniform_schedule_linear_t_is_linear_bit_for_bit(tiny):
    pipe = tiny.tiny_dit_pipeline(num_layers=2)
    plan = linear_plan("dit", {"attn": 2, "mlp": 2}, seed=11, timesteps=dit_schedule(pipe))
    outputs = []
    for rule in ("linear", "linear-t"):
        with cached(pipe, plan.with_step_reuse(rule).with_module_reuse(rule)):
            outputs.append(pipe(class_labels=[4], num_inference_steps=STEPS, guidance_scale=1.5,
                                generator=torch.Generator().manual_seed(0), output_type="np").images)  # fmt: skip
    assert np.array_equal(*outputs)


# computed 0, 2, 5, 9; step 1 reused after one computed step, 3-4 after two, 6-8 after three
FALLBACK_GATE = np.array([0, 1, 0, 1, 1, 0, 1, 1, 1, 0], bool)


def skipped_hidden_states(pipe, plan: CachePlan) -> tuple[list, list]:
    """H of each skipped step under the runtime and under the plain executor."""
    def generate():
        pipe(class_labels=[3], num_inference_steps=STEPS, guidance_scale=1.5, output_type="np",
             generator=torch.Generator().manual_seed(0))  # fmt: skip

    runtime, plain = [], []
    with cached(pipe, plan) as cache:
        take = cache.take_hidden
        cache.take_hidden = lambda: runtime.append(take()) or runtime[-1]
        generate()
    with PlainExecutor(pipe.transformer, plan) as executor:
        skipped = executor.skipped_hidden
        executor.skipped_hidden = lambda c, s: plain.append(skipped(c, s)) or plain[-1]
        generate()
    return runtime, plain


def test_too_few_computed_steps_fall_back_to_the_highest_order_available(tiny):
    """Step 1 (one computed step before it) is held under every rule; under quadratic-t steps
    3-4 (two computed) are first order: what linear-t gives."""
    pipe = tiny.tiny_dit_pipeline(num_layers=2)
    plan = linear_plan("dit", {"attn": 2, "mlp": 2}, seed=12, timesteps=dit_schedule(pipe))
    plan = plan.with_flags(FALLBACK_GATE, plan.modules)
    hidden = {}
    for rule in ("hold", "linear", "linear-t", "quadratic-t"):
        runtime, plain = skipped_hidden_states(pipe, plan.with_step_reuse(rule))
        assert len(runtime) == len(plain) == int(FALLBACK_GATE.sum())
        assert all(torch.equal(a, b) for a, b in zip(runtime, plain)), rule
        hidden[rule] = runtime
    assert all(torch.equal(hidden[rule][0], hidden["hold"][0]) for rule in hidden)
    assert not torch.equal(hidden["linear"][1], hidden["hold"][1])
    assert all(torch.equal(hidden["quadratic-t"][k], hidden["linear-t"][k]) for k in (1, 2))
    assert not torch.allclose(hidden["quadratic-t"][3], hidden["linear-t"][3], atol=1e-5)
