"""Plan-driven cached execution: diffusers hooks that reuse module outputs (ALGORITHM.md §7).

``enable_cache(pipeline_or_transformer, plan)`` attaches one hook to the transformer (it
finds the step from the called timestep), one per block (the step gate) and one per
reusable module. Each generation starts from empty caches (also after a generation that
failed); ``disable_cache`` removes every hook and restores the model exactly. The plan's
target is checked against what the run shows (:mod:`invardiff.checks`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook

from .architectures import MODULE_KINDS, TIMESTEP_SCALE, detect_architecture, layer_lists
from .checks import SetupGuard, calling_argument
from .plan import RULES, CachePlan, PlanError, executed_modules, hidden_held, module_held
from .stepping import StepTracker, find_timestep, timestep_argument

HOOK_NAME = "invardiff_cache"


@dataclass
class CacheStats:
    """What the runtime did in the current generation (its own bookkeeping)."""

    steps_computed: int = 0
    steps_skipped: int = 0
    module_calls: int = 0
    module_reuses: int = 0


@dataclass
class _Branch:
    """Caches of one transformer call per step (two under CFG-as-two-calls).

    ``modules`` and ``hidden`` hold the last computed output of each module and H of the last
    computed step; ``history`` the older ones an extrapolating rule still needs, newest first,
    each with its point in the rule's variable (key ``"hidden"`` for H).
    """

    modules: dict[tuple[str, int], Any] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    points: dict[Any, float] = field(default_factory=dict)  # the variable's value of modules[key] / hidden
    history: dict[Any, list[tuple[float, Any]]] = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this branch holds."""
        values = [*self.modules.values(), self.hidden]
        values += [value for entries in self.history.values() for _, value in entries]
        return [t for value in values if value is not None for t in (value if isinstance(value, tuple) else (value,))]


class PlanCache:
    """Executes a :class:`CachePlan` on a diffusers transformer (see :func:`enable_cache`)."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        plan: CachePlan,
        pipeline=None,
        timesteps=None,
        allow_mismatch: Iterable[str] = (),
    ) -> None:
        self.transformer = transformer
        self.plan = plan
        self.pipeline = pipeline
        self.scheduler = None if pipeline is None else getattr(pipeline, "scheduler", None)
        self.arch = check_plan_fits(plan, transformer)
        self.guard = SetupGuard(allow_mismatch)
        self.guard.model(plan, transformer)
        self.guard.scheduler(plan, self.scheduler)
        self.run = executed_modules(plan)
        self.module_count = {kind: flags.sum(axis=0) for kind, flags in module_held(plan).items()}
        self.hidden_count = hidden_held(plan).sum(axis=0)
        self.step_rule, self.module_rule = RULES[plan.step_reuse], RULES[plan.module_reuse]
        self.tracker = StepTracker(_initial_schedule(plan, timesteps))
        if self.tracker.schedule is None and self.scheduler is None:
            raise PlanError(
                "the plan records no timestep schedule; enable it on the pipeline (its scheduler "
                "gives the schedule) or pass timesteps=..."
            )
        self.stats = CacheStats()
        self.step = -1
        self.branch = 0
        self._branches: list[_Branch] = []
        self._hooked: list[torch.nn.Module] = []
        self._attach()

    # ---- generation state --------------------------------------------------------------
    def reset(self) -> None:
        """Forget every cached tensor; the next call starts a new generation."""
        self.step = -1
        self.branch = 0
        self._branches = []
        self.stats = CacheStats()

    def abandon(self) -> None:
        """A call failed: drop the generation in progress, so the next call starts a new one."""
        self.reset()
        self.tracker.abandon()

    def _begin_call(self, args: tuple, kwargs: dict) -> None:
        if self.pipeline is not None and getattr(self.pipeline, "scheduler", None) is not self.scheduler:
            raise PlanError(
                "the pipeline's scheduler was replaced after enable_cache; disable the cache and enable it again"
            )
        if self.tracker.last < 0 and self.tracker.progress == 0 and self.scheduler is not None:
            self.tracker.begin = getattr(self.scheduler, "begin_index", None) or 0  # img2img starts later
        step = self.tracker.locate(find_timestep(self.timestep_position, args, kwargs))
        if step < self.step:
            self.reset()  # a new generation without a scheduler signal (plain loops)
        if self.step < 0:  # the first call of a generation
            if self.scheduler is None:
                self.guard.model(self.plan, self.transformer)
            self.guard.call(self.plan, self.transformer, args, kwargs)
        self.branch = self.branch + 1 if step == self.step else 0
        self.step = step
        while len(self._branches) <= self.branch:
            self._branches.append(_Branch())
        # this step's flags as Python lists: the hooks look them up hundreds of times per step
        self._run_now = {kind: flags[step].tolist() for kind, flags in self.run.items()}
        self._count_now = {kind: counts[step].tolist() for kind, counts in self.module_count.items()}
        self._point_hidden = self._point(self.step_rule[1], step)
        self._point_module = self._point(self.module_rule[1], step)
        self._skip_now = bool(self.plan.step_gate[step]) and self.current.hidden is not None
        if self._skip_now:
            self.stats.steps_skipped += 1
        else:
            self.stats.steps_computed += 1

    def _point(self, variable: str, step: int) -> float:
        """The extrapolation variable at ``step``: the step index or the schedule's timestep."""
        return float(step) if variable == "step" else float(self.tracker.schedule[step])

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds now (all branches): what its memory figures count."""
        return [t for branch in self._branches for t in branch.tensors()]

    @property
    def current(self) -> _Branch:
        return self._branches[self.branch]

    def skipping(self) -> bool:
        """Is the whole current step reused (and is there an H to reuse)?"""
        return self._skip_now

    def reusing(self, kind: str, layer: int) -> bool:
        """Reuse the cached output of (kind, layer) at the current step?"""
        return not self._run_now[kind][layer] and (kind, layer) in self.current.modules

    def store(self, kind: str, layer: int, output: Any) -> None:
        """Keep a freshly computed output (and older ones a forecast needs) only if later used."""
        _keep(self.current, (kind, layer), output, self._point_module, self._count_now[kind][layer])

    def take(self, kind: str, layer: int) -> Any:
        """The output for reuse now (held, or forecast under ``module_reuse``); what no later
        step needs is released."""
        return _take(self.current, (kind, layer), self._point_module, self.module_rule[0],
                     self._count_now[kind][layer])  # fmt: skip

    def store_hidden(self, hidden: torch.Tensor) -> None:
        """Keep a computed step's H (and older ones the step rule needs) only if later used."""
        count = int(self.hidden_count[self.step])
        if count and hidden.untyped_storage().nbytes() > hidden.numel() * hidden.element_size():
            hidden = hidden.clone()  # FLUX: H is a slice of the joint text+image tensor
        _keep(self.current, "hidden", hidden, self._point_hidden, count)

    def take_hidden(self) -> torch.Tensor:
        """H of the current (skipped) step: H_last held, or extrapolated under ``step_reuse``."""
        return _take(self.current, "hidden", self._point_hidden, self.step_rule[0], int(self.hidden_count[self.step]))

    def set_schedule(self, timesteps: Any) -> None:
        """Called when the pipeline's scheduler sets its timesteps: a new generation starts."""
        self.guard.model(self.plan, self.transformer)
        self.guard.scheduler(self.plan, self.scheduler)
        self.guard.guidance(self.plan, calling_argument(self.pipeline, "guidance_scale"))
        schedule = np.asarray(torch.as_tensor(timesteps).detach().cpu().double()) * TIMESTEP_SCALE[self.arch]
        if len(schedule) != self.plan.steps:
            raise PlanError(
                f"the pipeline runs {len(schedule)} steps but the plan was calibrated for {self.plan.steps}; "
                "calibrate or fetch a plan for this step count"
            )
        if self.plan.target.timesteps is not None:
            planned = np.asarray(self.plan.target.timesteps, dtype=np.float64)
            if not np.allclose(schedule, planned, rtol=1e-2, atol=1e-6):
                raise PlanError(
                    "the pipeline's timestep schedule differs from the plan's "
                    f"(first {schedule[0]:g} vs {planned[0]:g}, last {schedule[-1]:g} vs {planned[-1]:g}); "
                    "the scheduler or its config changed"
                )
        self.tracker.start_generation(None if self.plan.target.timesteps is not None else schedule.tolist())
        self.reset()

    # ---- hooks -------------------------------------------------------------------------
    def _attach(self) -> None:
        self.timestep_position = timestep_argument(self.transformer.forward)
        self._register(self.transformer, _TransformerHook(self))
        blocks = [(name, i, b) for name in layer_lists(self.arch) for i, b in enumerate(getattr(self.transformer, name))]
        for n, (_, _, block) in enumerate(blocks):
            self._register(block, _BlockHook(self, self.arch, last=n == len(blocks) - 1))
        for kind in MODULE_KINDS[self.arch]:
            if kind.name == "context_attn":
                continue  # FLUX joint attention: the `attn` hook caches both halves as one output
            for layer, block in enumerate(getattr(self.transformer, kind.layers)):
                module = getattr(block, kind.attribute)
                if kind.name == "single_mlp":
                    self._register(module, _ModuleHook(self, "single_mlp", layer, compute_only=True))
                    self._register(block.act_mlp, _ModuleHook(self, "single_mlp", layer, pass_through=True))
                else:
                    self._register(module, _ModuleHook(self, kind.name, layer))
        if self.scheduler is not None:
            self._wrap_scheduler(self.scheduler)

    def _register(self, module: torch.nn.Module, hook: ModelHook) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        if registry.get_hook(HOOK_NAME) is not None:
            raise PlanError("a cache plan is already enabled on this model; disable it first")
        registry.register_hook(hook, HOOK_NAME)
        self._hooked.append(module)

    def _wrap_scheduler(self, scheduler) -> None:
        set_original, step_original = scheduler.set_timesteps, scheduler.step

        @functools.wraps(set_original)  # pipelines inspect its signature
        def set_timesteps(*args, **kwargs):
            result = set_original(*args, **kwargs)
            self.set_schedule(scheduler.timesteps)
            return result

        @functools.wraps(step_original)
        def step(*args, **kwargs):
            result = step_original(*args, **kwargs)
            self.tracker.advance()
            return result

        scheduler.set_timesteps = set_timesteps
        scheduler.step = step

    def disable(self) -> None:
        """Remove every hook and cached tensor; the model is exactly as before (stats are kept)."""
        for module in self._hooked:
            module._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
        self._hooked = []
        for name in ("set_timesteps", "step"):
            if self.scheduler is not None and name in vars(self.scheduler):
                delattr(self.scheduler, name)
        self._branches = []  # release cached tensors; stats stay readable
        if getattr(self.transformer, "_invardiff_cache", None) is self:
            del self.transformer._invardiff_cache


class _TransformerHook(ModelHook):
    """Finds the step of each call; a call that fails abandons its generation."""

    def __init__(self, cache: PlanCache) -> None:
        super().__init__()
        self.cache = cache

    def new_forward(self, module, *args, **kwargs):
        try:
            self.cache._begin_call(args, kwargs)
            return self.fn_ref.original_forward(*args, **kwargs)
        except BaseException:
            self.cache.abandon()
            raise


class _BlockHook(ModelHook):
    """Step gate: on a skipped step blocks pass their input through; the last one returns H."""

    def __init__(self, cache: PlanCache, arch: str, last: bool) -> None:
        super().__init__()
        self.cache = cache
        self.arch = arch
        self.last = last

    def new_forward(self, module, *args, **kwargs):
        cache = self.cache
        if cache.skipping():
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.last:
                hidden = cache.take_hidden()
            if self.arch == "dit":
                return hidden
            return kwargs["encoder_hidden_states"], hidden
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.last:
            cache.store_hidden(output if self.arch == "dit" else output[1])
        return output


class _ModuleHook(ModelHook):
    """Reuse or compute one module (kind, layer).

    The FLUX single-block mlp is ``act_mlp(proj_mlp(x))``: ``proj_mlp`` gets a
    ``compute_only`` hook (returns the cached activation instead of computing) and
    ``act_mlp`` a ``pass_through`` hook (passes it on, or computes and stores).
    """

    def __init__(self, cache: PlanCache, kind: str, layer: int, compute_only=False, pass_through=False) -> None:
        super().__init__()
        self.cache = cache
        self.kind = kind
        self.layer = layer
        self.compute_only = compute_only
        self.pass_through = pass_through

    def new_forward(self, module, *args, **kwargs):
        cache = self.cache
        if cache.reusing(self.kind, self.layer):
            if not self.pass_through:
                cache.stats.module_reuses += 1
            if self.compute_only:
                return None  # act_mlp's hook hands out the cached activation
            return cache.take(self.kind, self.layer)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if not self.pass_through:
            cache.stats.module_calls += 1
        if not self.compute_only:
            cache.store(self.kind, self.layer, output)
        return output


def extrapolate(points: list[tuple[float, Any]], at: float) -> Any:
    """The polynomial through ``points`` ((x, value), newest first, at most three) at ``at``.

    One point: its value (hold); two: first order, ``v_a + (v_a - v_b) * (at - a) / (a - b)``;
    three: second order (Lagrange weights). A tuple value is extrapolated element by element.
    """
    if len(points) == 1:
        return points[0][1]
    if isinstance(points[0][1], tuple):
        return tuple(extrapolate([(x, v[k]) for x, v in points], at) for k in range(len(points[0][1])))
    if len(points) == 2:
        (a, v_a), (b, v_b) = points
        return v_a + (v_a - v_b) * ((at - a) / (a - b))
    (a, v_a), (b, v_b), (c, v_c) = points
    w_a = (at - b) * (at - c) / ((a - b) * (a - c))
    w_b = (at - a) * (at - c) / ((b - a) * (b - c))
    w_c = (at - a) * (at - b) / ((c - a) * (c - b))
    return v_a * w_a + v_b * w_b + v_c * w_c


def _keep(branch: _Branch, key: Any, value: Any, point: float, count: int) -> None:
    """A newly computed ``value``: keep the newest ``count`` outputs of ``key`` (0: none)."""
    entries = [(point, value)] + _entries(branch, key)
    _set_entries(branch, key, entries[:count])


def _take(branch: _Branch, key: Any, point: float, order: int, count: int) -> Any:
    """The value of ``key`` at ``point`` from its newest ``order + 1`` outputs (fewer if fewer
    are computed); then keep only the newest ``count``."""
    entries = _entries(branch, key)
    value = extrapolate(entries[: order + 1], point)
    _set_entries(branch, key, entries[:count])
    return value


def _entries(branch: _Branch, key: Any) -> list[tuple[float, Any]]:
    last = branch.hidden if key == "hidden" else branch.modules.get(key)
    if last is None:
        return []
    return [(branch.points[key], last)] + branch.history.get(key, [])


def _set_entries(branch: _Branch, key: Any, entries: list[tuple[float, Any]]) -> None:
    point, last = entries[0] if entries else (None, None)
    if key == "hidden":
        branch.hidden = last
    elif entries:
        branch.modules[key] = last
    else:
        branch.modules.pop(key, None)
    if entries:
        branch.points[key] = point
    else:
        branch.points.pop(key, None)
    if len(entries) > 1:
        branch.history[key] = entries[1:]
    else:
        branch.history.pop(key, None)


def check_plan_fits(plan: CachePlan, transformer: torch.nn.Module) -> str:
    """Raise PlanError saying what differs if ``plan`` cannot drive ``transformer``."""
    arch = detect_architecture(transformer)
    if arch != plan.arch:
        raise PlanError(f"plan is for a {plan.arch} transformer but the model is {arch} ({type(transformer).__name__})")
    problems = []
    for kind in MODULE_KINDS[arch]:
        blocks = getattr(transformer, kind.layers)
        expected = plan.modules[kind.name].shape[1]
        if len(blocks) != expected:
            problems.append(f"{kind.name}: plan has {expected} layers, model.{kind.layers} has {len(blocks)}")
        elif not all(hasattr(b, kind.attribute) for b in blocks):
            problems.append(f"{kind.name}: model.{kind.layers}[*] has no '{kind.attribute}'")
    if problems:
        raise PlanError("plan does not fit the model: " + "; ".join(dict.fromkeys(problems)))
    return arch


def _initial_schedule(plan: CachePlan, timesteps) -> list[float] | None:
    if timesteps is not None:
        schedule = [float(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
        if len(schedule) != plan.steps:
            raise PlanError(f"{len(schedule)} timesteps given for a {plan.steps}-step plan")
        return schedule
    return None if plan.target.timesteps is None else list(plan.target.timesteps)


def _split(target) -> tuple[torch.nn.Module, Any]:
    """(transformer, pipeline or None)."""
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer, target
    if isinstance(target, torch.nn.Module):
        return target, None
    raise TypeError(f"expected a diffusers pipeline or transformer, got {type(target).__name__}")


def enable_cache(target, plan: CachePlan, timesteps=None, allow_mismatch: Iterable[str] = ()) -> PlanCache:
    """Attach ``plan`` to a pipeline (or a bare transformer) and return the live cache.

    With a pipeline, each ``scheduler.set_timesteps`` starts a new generation and checks the
    step count and schedule. A bare transformer uses the plan's recorded schedule (or
    ``timesteps``) and starts a new generation when the step index goes back or a call fails.
    The plan's target is checked against the run (dtype, resolution, guidance, scheduler and
    its config: :data:`invardiff.checks.CHECKED_FIELDS`); a mismatch raises
    :class:`~invardiff.checks.PlanMismatchError` unless its field is in ``allow_mismatch``,
    which lets it run with one :class:`~invardiff.checks.PlanMismatchWarning`.
    """
    transformer, pipeline = _split(target)
    cache = PlanCache(transformer, plan, pipeline=pipeline, timesteps=timesteps, allow_mismatch=allow_mismatch)
    transformer._invardiff_cache = cache
    return cache


def disable_cache(target) -> None:
    """Remove the plan attached by :func:`enable_cache` (no-op if none)."""
    transformer, _ = _split(target)
    cache = getattr(transformer, "_invardiff_cache", None)
    if cache is not None:
        cache.disable()


@contextmanager
def cached(target, plan: CachePlan, timesteps=None, allow_mismatch: Iterable[str] = ()) -> Iterator[PlanCache]:
    """``with cached(pipe, plan): pipe(...)`` runs the pipeline under ``plan`` (see :func:`enable_cache`)."""
    cache = enable_cache(target, plan, timesteps=timesteps, allow_mismatch=allow_mismatch)
    try:
        yield cache
    finally:
        cache.disable()
