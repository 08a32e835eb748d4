"""The caching methods of the peers benchmark, each a thin adapter on its own pipeline.

A :class:`Method` installs itself on a freshly loaded built-in pipeline; afterwards every plain
pipeline call runs under it. Set-up the digits pipelines do not give the peers by themselves:

- diffusers' hooks read a cache context: the transformer call is wrapped in
  ``cache_context("cond")`` (CFG is batched into one call per step, so one context);
- DiT has no ``CacheMixin``: the ``apply_*`` functions are used directly, for both models;
- hook state is reset when the scheduler sets its timesteps, i.e. at every generation;
- PAB and FasterCache read the current timestep (scheduler units, 0-1000) from the call;
- FasterCache expects the CFG batch as [uncond, cond] and images as BCHW: the call is
  reordered around it, and FLUX tokens are unpacked to 16x16 images under its hook;
- MagCache gets its own calibration (its ``calibrate=True`` mode) on the calls InvarDiff
  calibrates on;
- cache-dit patches the pipeline *class*'s ``__call__``: each of its pipelines gets a subclass.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.cache_utils import CacheMixin

import invardiff
from benchmarks.measures import RecordingMeasure
from invardiff import CachePlan, Geometry, PlanTarget, all_compute_plan
from invardiff.architectures import MODULE_KINDS, TIMESTEP_SCALE
from invardiff.holdout import held_out_sets, holdout_measure
from invardiff.models import load_builtin
from invardiff.models.digits import IMAGE_SIZE, pack, unpack
from invardiff.stepping import find_timestep, timestep_argument


class Unsupported(Exception):
    """A method that cannot run on a model; the message is the reason shown in the table."""


@dataclass
class ModelSetup:
    """One built-in model's protocol and the calls calibrating methods use."""

    name: str
    arch: str
    steps: int
    guidance: float
    calls: list[dict[str, Any]]
    memo: dict[str, Any] = field(default_factory=dict)  # per-model results shared by settings


Install = Callable[[DiffusionPipeline, ModelSetup], "CachePlan | None"]


@dataclass
class Method:
    """A family (``"InvarDiff"``, ``"FirstBlockCache"``, ...) at one setting.

    ``install(pipe, setup)`` puts the method on ``pipe`` and returns the plan it executes
    (InvarDiff and every-k) or None; it raises :class:`Unsupported` where the method cannot run.
    """

    family: str
    setting: str
    install: Install


# ---- full compute, InvarDiff plans, every-k ---------------------------------------------------
def full_compute() -> Method:
    return Method("full compute", "reference", lambda pipe, setup: None)


def budget_measures(setup: ModelSetup) -> dict[str, RecordingMeasure]:
    """The selection and certification measures of every budget point of a model: the
    calibration calls' default held-out sets, on a pipeline of their own (the others carry a
    method), shared so that a plan measured for one target (the step profile) is not measured
    again for the next; the figures, hence the plans, are those of a plain ``calibrate``."""
    if "budget_measures" not in setup.memo:
        pipe = load_builtin(setup.name)
        pipe.set_progress_bar_config(disable=True)
        selection, certification = held_out_sets(setup.calls)
        setup.memo["budget_measures"] = {"measure": RecordingMeasure(holdout_measure(pipe, selection)),
                                         "certify": RecordingMeasure(holdout_measure(pipe, certification))}  # fmt: skip
    return setup.memo["budget_measures"]


def invardiff_plan(setting: str, **params: Any) -> Method:
    """A plan calibrated by ``invardiff.calibrate(pipe, calls, **params)`` (budget targets with
    the model's shared :func:`budget_measures`)."""

    def install(pipe, setup):
        budget = any(key in params for key in ("target_speedup", "min_psnr", "min_psnr_p5"))
        measures = budget_measures(setup) if budget else {}
        try:
            plan = invardiff.calibrate(pipe, setup.calls, model_id=setup.name, **params, **measures)
        except (TypeError, ValueError) as exc:
            if any(name in str(exc) for name in params):
                raise Unsupported(f"invardiff.calibrate rejects {params}: {exc}") from None
            raise
        invardiff.enable_cache(pipe, plan)
        return plan

    return Method("InvarDiff", setting, install)


def template_plan(pipe: DiffusionPipeline, setup: ModelSetup) -> CachePlan:
    """An all-compute plan with the model's layer counts and geometry (for the summary)."""
    transformer = pipe.transformer
    config = transformer.config
    layers = {k.name: len(getattr(transformer, k.layers)) for k in MODULE_KINDS[setup.arch]}
    width = config.num_attention_heads * config.attention_head_dim
    patch = config.patch_size if setup.arch == "dit" else 2  # FLUX: 2x2 packing
    context = pipe.class_embeddings.config.context_tokens if setup.arch == "flux" else 0
    geometry = Geometry(dim=width, tokens=(IMAGE_SIZE // patch) ** 2, context_tokens=context)
    target = PlanTarget(model_id=setup.name, steps=setup.steps, dtype="float32")
    return all_compute_plan(setup.arch, setup.steps, layers, target=target, geometry=geometry)


def plan_method(family: str, setting: str, make: Callable[[CachePlan], CachePlan]) -> Method:
    """A fixed plan built from the model's all-compute template."""

    def install(pipe, setup):
        plan = make(template_plan(pipe, setup))
        invardiff.enable_cache(pipe, plan)
        return plan

    return Method(family, setting, install)


# ---- diffusers' caches ----------------------------------------------------------------------
class Clock:
    """The current call's timestep in scheduler units (0-1000), for PAB and FasterCache."""

    value = 1000.0

    def __call__(self) -> float:
        return self.value


# Keyword arguments that carry the CFG batch (FasterCache splits and we reorder them).
BATCH_INPUTS = {
    "dit": ("hidden_states", "timestep", "class_labels"),
    "flux": ("hidden_states", "timestep", "pooled_projections", "encoder_hidden_states"),
}

# Modules TaylorSeer forecasts: every attention and MLP (its default patterns match only
# attentions, and nothing on DiT).
TAYLOR_MODULES = {
    "dit": [r"transformer_blocks\.\d+\.(attn1|ff)"],
    "flux": [
        r"transformer_blocks\.\d+\.(attn|ff|ff_context)",
        r"single_transformer_blocks\.\d+\.(attn|proj_mlp)",
    ],
}


def _swap_halves(x: Any) -> Any:
    """[a, b] -> [b, a] along the batch: cond-first CFG batches <-> FasterCache's uncond-first."""
    if not isinstance(x, torch.Tensor):
        return x
    half = x.shape[0] // 2
    return torch.cat([x[half:], x[:half]])


def _map_sample(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    output.sample = fn(output.sample)
    return output


class _ImageLayout(ModelHook):
    """FLUX output tokens (N, 64, 4) -> images (N, 1, 16, 16), under FasterCache's hook."""

    def post_forward(self, module, output):
        return _map_sample(output, lambda x: unpack(x, IMAGE_SIZE, IMAGE_SIZE))


def _wrap_call(transformer, arch: str, clock: Clock, cfg_uncond_first: bool) -> None:
    """Open a cache context around each transformer call and record its timestep."""
    hooked = transformer.forward
    position = timestep_argument(type(transformer).forward)
    names = BATCH_INPUTS[arch]

    def forward(*args, **kwargs):
        timestep = find_timestep(position, args, kwargs)
        clock.value = float(timestep.reshape(-1)[0]) / TIMESTEP_SCALE[arch]
        if cfg_uncond_first:
            args = tuple(_swap_halves(a) if i == 0 else a for i, a in enumerate(args))
            kwargs = {k: _swap_halves(v) if k in names else v for k, v in kwargs.items()}
        with CacheMixin.cache_context(transformer, "cond"):
            output = hooked(*args, **kwargs)
        if cfg_uncond_first:
            restore = (lambda x: pack(_swap_halves(x))) if arch == "flux" else _swap_halves
            output = _map_sample(output, restore)
        return output

    transformer.forward = forward


def _reset_each_generation(pipe: DiffusionPipeline) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    original = pipe.scheduler.set_timesteps

    @functools.wraps(original)
    def set_timesteps(*args, **kwargs):
        registry.reset_stateful_hooks(recurse=True)
        return original(*args, **kwargs)

    pipe.scheduler.set_timesteps = set_timesteps


def diffusers_cache(family: str, setting: str, apply: Callable[[torch.nn.Module, ModelSetup, Clock], None],
                    faster_cache: bool = False) -> Method:  # fmt: skip
    """A diffusers hook family: ``apply(transformer, setup, clock)`` registers its hooks."""

    def install(pipe, setup):
        transformer = pipe.transformer
        if faster_cache and setup.guidance <= 1:
            raise Unsupported("FasterCache needs classifier-free guidance (guidance > 1)")
        if faster_cache and setup.arch == "flux":
            HookRegistry.check_if_exists_or_initialize(transformer).register_hook(
                _ImageLayout(), "image_layout"
            )
        clock = Clock()
        apply(transformer, setup, clock)
        _wrap_call(transformer, setup.arch, clock, cfg_uncond_first=faster_cache)
        _reset_each_generation(pipe)

    return Method(family, setting, install)


def first_block_cache(threshold: float) -> Method:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    return diffusers_cache("FirstBlockCache", f"threshold {threshold:g}",
                           lambda tr, s, c: apply_first_block_cache(tr, FirstBlockCacheConfig(threshold=threshold)))  # fmt: skip


def taylorseer(interval: int, order: int = 1) -> Method:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    def apply(transformer, setup, clock):
        config = TaylorSeerCacheConfig(cache_interval=interval, max_order=order, disable_cache_before_step=3,
                                       taylor_factors_dtype=torch.float32, cache_identifiers=TAYLOR_MODULES[setup.arch])  # fmt: skip
        apply_taylorseer_cache(transformer, config)

    return diffusers_cache("TaylorSeer", f"interval {interval}, order {order}", apply)


def pyramid_attention_broadcast(skip: int, timesteps: tuple[int, int] = (100, 800)) -> Method:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    def apply(transformer, setup, clock):
        config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=skip,
                                                 spatial_attention_timestep_skip_range=timesteps,
                                                 current_timestep_callback=clock)  # fmt: skip
        apply_pyramid_attention_broadcast(transformer, config)

    return diffusers_cache(
        "PyramidAttentionBroadcast", f"attention every {skip}, t in {timesteps}", apply
    )


def faster_cache(attention_skip: int, uncond_skip: int) -> Method:
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache

    def apply(transformer, setup, clock):
        config = FasterCacheConfig(spatial_attention_block_skip_range=attention_skip,
                                   unconditional_batch_skip_range=uncond_skip, current_timestep_callback=clock,
                                   attention_weight_callback=lambda _: 0.5, tensor_format="BCHW",
                                   _unconditional_conditional_input_kwargs_identifiers=list(BATCH_INPUTS[setup.arch]))  # fmt: skip
        with _quiet_diffusers():
            apply_faster_cache(transformer, config)

    return diffusers_cache("FasterCache", f"attention every {attention_skip}, uncond every {uncond_skip}", apply,
                           faster_cache=True)  # fmt: skip


def mag_cache(threshold: float, max_skip_steps: int = 3) -> Method:
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    def apply(transformer, setup, clock):
        if "mag_ratios" not in setup.memo:
            setup.memo["mag_ratios"] = mag_ratios(setup)
        config = MagCacheConfig(threshold=threshold, max_skip_steps=max_skip_steps, num_inference_steps=setup.steps,
                                mag_ratios=setup.memo["mag_ratios"])  # fmt: skip
        apply_mag_cache(transformer, config)

    return diffusers_cache("MagCache", f"threshold {threshold:g}, max skip {max_skip_steps}", apply)


def mag_ratios(setup: ModelSetup) -> list[float]:
    """MagCache's own calibration: its ``calibrate=True`` run on each calibration call (it
    prints the ratios to copy into the config); the mean over calls."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    pipe = load_builtin(setup.name)
    pipe.set_progress_bar_config(disable=True)
    apply_mag_cache(
        pipe.transformer, MagCacheConfig(calibrate=True, num_inference_steps=setup.steps)
    )
    _wrap_call(pipe.transformer, setup.arch, Clock(), cfg_uncond_first=False)
    _reset_each_generation(pipe)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), torch.no_grad():
        for call in setup.calls:
            kwargs = {k: v for k, v in call.items() if k != "seed"}
            pipe(**kwargs, generator=torch.Generator().manual_seed(call["seed"]), output_type="np")
    runs = [ast.literal_eval(line) for line in printed.getvalue().splitlines() if line.startswith("[") and
            not line.startswith("[MagCache]")]  # fmt: skip
    if len(runs) != len(setup.calls) or any(len(r) != setup.steps for r in runs):
        raise Unsupported(
            f"MagCache calibration printed {len(runs)} ratio lists for {len(setup.calls)} calls"
        )
    return np.mean(np.asarray(runs, dtype=np.float64), axis=0).tolist()


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # FasterCache warns that it is experimental on every apply
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


# ---- cache-dit --------------------------------------------------------------------------------
def cache_dit(setting: str, taylorseer_order: int = 0, **config: Any) -> Method:
    """cache-dit's DBCache (optionally with its TaylorSeer calibrator) with ``DBCacheConfig(**config)``."""

    def install(pipe, setup):
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
        try:
            import cache_dit
        except ImportError:
            raise Unsupported(
                "cache-dit is not installed (pip install 'invardiff[bench]')"
            ) from None
        # cache-dit wraps the pipeline class's __call__: give this pipeline a class of its own
        pipe.__class__ = type(type(pipe).__name__, (type(pipe),), {})
        cache_config = cache_dit.DBCacheConfig(num_inference_steps=setup.steps, **config)
        calibrator = (
            cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=taylorseer_order)
            if taylorseer_order
            else None
        )
        target = pipe
        if (
            setup.arch == "flux"
        ):  # cache-dit's Flux layout; its adapter lookup keys on FluxPipeline's name
            transformer = pipe.transformer
            target = cache_dit.BlockAdapter(
                pipe=pipe, transformer=transformer,
                blocks=[transformer.transformer_blocks, transformer.single_transformer_blocks],
                forward_pattern=[cache_dit.ForwardPattern.Pattern_1, cache_dit.ForwardPattern.Pattern_1],
                check_forward_pattern=True,
            )  # fmt: skip
        elif not cache_dit.BlockAdapterRegister.is_supported(pipe):
            raise Unsupported(f"cache-dit has no adapter for {type(pipe).__name__}")
        cache_dit.enable_cache(target, cache_config=cache_config, calibrator_config=calibrator)

    name = "cache-dit DBCache" + ("+TaylorSeer" if taylorseer_order else "")
    return Method(name, setting, install)
