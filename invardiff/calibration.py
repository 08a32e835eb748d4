"""Calibration: deterministic trajectories -> statistics -> a :class:`CachePlan`.

``calibrate(pipeline, calls)`` runs every call twice (phase 1 change scores, then the
re-sampling correction of phase 2 given the provisional plan). The pieces are public so a
fleet can run trajectories elsewhere and merge their :class:`TrajectoryStats`:
``trajectory_stats`` -> ``provisional_flags`` -> ``trajectory_stats(provisional=...)`` ->
``final_flags`` -> ``build_plan``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .architectures import Geometry, detect_architecture, module_kinds
from .checks import jsonable as _jsonable
from .checks import model_dtype, scheduler_config_hash
from .plan import CachePlan, PlanTarget, canonical_json
from .recording import HIDDEN, TrajectoryRecorder
from .scores import (
    FLAG_INDEX_MODES,
    cap_runs,
    mask_steps,
    mean_over_trajectories,
    recompute_after_skip,
    threshold,
    warmup_steps,
)

# 2: measured step-sensitivity placements; 3: selection and certification sets;
# 4: batched held-out measurements, module forecasting candidates, min_psnr over every family;
# 5: min_psnr_p5 certified on a lower bound of the 5th percentile (45 samples or more)
CALIBRATOR_VERSION = "5"
MODES = ("budget", "reference")

PRESETS: dict[str, dict[str, dict[str, float]]] = {
    "dit": {
        "fast": {"nonskip": 0.0, "q_step": 0.63, "q_attn": 0.22, "q_mlp": 0.22},
        "slow": {"nonskip": 0.0, "q_step": 0.61, "q_attn": 0.20, "q_mlp": 0.20},
    },
    "flux": {
        "fast": {
            "nonskip": 0.10, "q_step": 0.70, "q_attn": 0.68, "q_ff": 0.68,
            "q_context_ff": 0.68, "q_single_attn": 0.68, "q_single_mlp": 0.68,
        },
        "slow": {
            "nonskip": 0.22, "q_step": 0.72, "q_attn": 0.68, "q_ff": 0.66,
            "q_context_ff": 0.0, "q_single_attn": 0.68, "q_single_mlp": 0.62,
        },
    },
}  # fmt: skip


@dataclass(frozen=True)
class CalibrationParams:
    """Quantiles and options of one calibration (ALGORITHM.md §3-§6, §9).

    ``q`` maps module kind -> quantile (FLUX ``context_attn`` defaults to ``attn``'s).
    ``flag_index``: ``"reference"`` (step i compares change i->i+1 with i-1->i) or
    ``"aligned"``. ``correct_flux_step_gate``: also run phase 2 on the FLUX step gate (the
    reference keeps the phase-1 gate). ``max_consecutive``: cap on consecutive reuse
    (``None``: no cap, as the reference).
    """

    arch: str
    nonskip: float
    q_step: float
    q: dict[str, float]
    flag_index: str = "reference"
    correct_flux_step_gate: bool = False
    max_consecutive: int | None = None

    @classmethod
    def resolve(cls, arch: str, preset: str | None = None, **overrides: Any) -> CalibrationParams:
        """Preset values (default ``"fast"``) with single values overridden."""
        preset = preset or "fast"
        if preset not in PRESETS[arch]:
            raise ValueError(f"unknown preset {preset!r} for {arch} (known: {', '.join(PRESETS[arch])})")
        values = dict(PRESETS[arch][preset])
        kinds = module_kinds(arch)
        known = {"nonskip", "q_step", *(f"q_{k}" for k in kinds), "flag_index", "correct_flux_step_gate",
                 "max_consecutive"}  # fmt: skip
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown calibration parameter(s): {', '.join(sorted(unknown))}")
        values.update(overrides)
        q = {k: float(values.get(f"q_{k}", values.get("q_attn") if k == "context_attn" else 0.0)) for k in kinds}
        params = cls(
            arch=arch,
            nonskip=float(values["nonskip"]),
            q_step=float(values["q_step"]),
            q=q,
            flag_index=values.get("flag_index", "reference"),
            correct_flux_step_gate=bool(values.get("correct_flux_step_gate", False)),
            max_consecutive=values.get("max_consecutive"),
        )
        params.validate()
        return params

    def validate(self) -> None:
        for name, value in [("q_step", self.q_step), *((f"q_{k}", v) for k, v in self.q.items())]:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if not 0.0 <= self.nonskip < 1.0:
            raise ValueError(f"nonskip must be within [0, 1), got {self.nonskip}")
        if self.flag_index not in FLAG_INDEX_MODES:
            raise ValueError(f"flag_index must be one of {FLAG_INDEX_MODES}, got {self.flag_index!r}")

    def corrects_step_gate(self) -> bool:
        return self.arch == "dit" or self.correct_flux_step_gate

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TrajectoryStats:
    """One trajectory's scores for one phase: small, serializable, mergeable.

    ``index`` orders trajectories when merging, so the merge order never matters.
    """

    phase: int
    index: int
    call: dict[str, Any]
    timesteps: list[float]
    scores: dict[str, torch.Tensor]
    geometry: Geometry | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """safetensors bytes (scores) with the rest as JSON metadata; no pickle."""
        meta = {
            "phase": self.phase,
            "index": self.index,
            "call": self.call,
            "timesteps": self.timesteps,
            "geometry": None if self.geometry is None else self.geometry.to_json(),
            "extra": self.extra,
        }
        tensors = {k: v.contiguous() for k, v in self.scores.items()}
        return save_tensors(tensors, metadata={"invardiff": canonical_json(meta).decode()})

    @classmethod
    def from_bytes(cls, data: bytes) -> TrajectoryStats:
        tensors = load_tensors(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["invardiff"])
        geometry = meta["geometry"]
        return cls(
            phase=meta["phase"],
            index=meta["index"],
            call=meta["call"],
            timesteps=meta["timesteps"],
            scores=tensors,
            geometry=None if geometry is None else Geometry.from_json(geometry),
            extra=meta["extra"],
        )


def merge_scores(stats: list[TrajectoryStats]) -> dict[str, torch.Tensor]:
    """Mean over trajectories per score key, in trajectory-index order."""
    if not stats:
        raise ValueError("no trajectory statistics to merge")
    ordered = sorted(stats, key=lambda s: s.index)
    if len({s.index for s in ordered}) != len(ordered):
        raise ValueError("duplicate trajectory index in the statistics to merge")
    if len({s.phase for s in ordered}) != 1:
        raise ValueError("cannot merge statistics of different phases")
    reference = ordered[0].timesteps
    for s in ordered:
        if s.timesteps != reference:
            raise ValueError(f"trajectory {s.index} ran another timestep schedule than trajectory {ordered[0].index}")
    return {key: mean_over_trajectories([s.scores[key] for s in ordered]) for key in ordered[0].scores}


def provisional_flags(phase1: dict[str, torch.Tensor], params: CalibrationParams) -> dict[str, torch.Tensor]:
    """Masked phase-1 flags that drive phase 2 (``hidden`` is the step gate, ``[T x 1]``).

    Like the reference, FLUX module flags are masked only at step 0 and the last step here;
    the step gate and all DiT flags use the full warm-up prefix.
    """
    steps = phase1[HIDDEN].shape[0]
    warmup = warmup_steps(params.nonskip, steps)
    flags = {HIDDEN: mask_steps(threshold(phase1[HIDDEN], params.q_step, params.flag_index), warmup)}
    module_warmup = 1 if params.arch == "flux" else warmup
    for kind, q in params.q.items():
        flags[kind] = mask_steps(threshold(phase1[kind], q, params.flag_index), module_warmup)
    return flags


def final_flags(
    phase2: dict[str, torch.Tensor], provisional: dict[str, torch.Tensor], params: CalibrationParams
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Final step gate ``[T]`` and module flags from the phase-2 scores (ALGORITHM.md §4-§5)."""
    steps = provisional[HIDDEN].shape[0]
    warmup = warmup_steps(params.nonskip, steps)
    if params.corrects_step_gate():
        gate = threshold(phase2[HIDDEN], params.q_step, params.flag_index)
    else:
        gate = provisional[HIDDEN]
    gate = mask_steps(cap_runs(gate, params.max_consecutive), warmup)[:, 0]
    modules = {kind: mask_steps(threshold(phase2[kind], q, params.flag_index), warmup) for kind, q in params.q.items()}
    modules = recompute_after_skip(gate, modules)
    modules = {kind: cap_runs(flags, params.max_consecutive, skipped=gate) for kind, flags in modules.items()}
    return gate, modules


# ---- running trajectories ----------------------------------------------------------------
Runner = Callable[[dict[str, Any], torch.Generator], Any]


def pipeline_runner(pipeline) -> Runner:
    """Run one call dict (its ``seed`` becomes a CPU generator) on a diffusers pipeline."""
    accepts = inspect.signature(pipeline.__call__).parameters

    def run(call: dict[str, Any], generator: torch.Generator) -> Any:
        kwargs = {k: v for k, v in call.items() if k != "seed"}
        if "output_type" in accepts and "output_type" not in kwargs:
            kwargs["output_type"] = "latent"
        with torch.no_grad():
            return pipeline(**kwargs, generator=generator)

    return run


def trajectory_stats(
    transformer: torch.nn.Module,
    runner: Runner,
    call: dict[str, Any],
    index: int,
    steps: int,
    params: CalibrationParams,
    provisional: dict[str, torch.Tensor] | None = None,
) -> TrajectoryStats:
    """Run one deterministic trajectory and return its phase-1 (or, given ``provisional``,
    phase-2) statistics."""
    if "seed" not in call:
        raise ValueError(f"calibration call {index} has no 'seed'")
    drive = None
    if provisional is not None:
        drive = {k: v for k, v in provisional.items() if k != HIDDEN or params.corrects_step_gate()}
    recorder = TrajectoryRecorder(transformer, params.arch, steps, provisional=drive, flag_index=params.flag_index)
    generator = torch.Generator().manual_seed(int(call["seed"]))
    with recorder:
        runner(call, generator)
    return TrajectoryStats(
        phase=1 if provisional is None else 2,
        index=index,
        call=_jsonable(call),
        timesteps=recorder.timesteps,
        scores=recorder.scores(),
        geometry=recorder.geometry,
    )


def calibrate(
    pipeline,
    calls: list[dict[str, Any]],
    preset: str | None = None,
    *,
    runner: Runner | None = None,
    model_id: str | None = None,
    revision: str | None = None,
    progress: Callable[[str], None] | None = None,
    mode: str | None = None,
    target_speedup: float | None = None,
    min_psnr: float | None = None,
    min_psnr_p5: float | None = None,
    holdout: list[dict[str, Any]] | None = None,
    certification: list[dict[str, Any]] | None = None,
    measure: Callable | None = None,
    certify: Callable | None = None,
    **params: Any,
) -> CachePlan:
    """Calibrate a plan from deterministic trajectories.

    ``pipeline`` is a diffusers pipeline (or a bare transformer with ``runner``, a function
    ``runner(call, generator)`` that samples one trajectory, e.g. a plain loop). ``calls`` are
    the keyword arguments of each pipeline call plus a ``seed``; they must share steps,
    resolution and guidance.

    ``mode="budget"`` (the default when a target is given; ``len(calls)`` runs plus held-out
    measurements, docs/plan-quality.md, docs/certification.md): ``target_speedup=X`` gives the
    most faithful plan whose ideal speed-up is at least X, ``min_psnr=Y`` the fastest plan whose
    certified mean PSNR against full compute is at least Y dB, ``min_psnr_p5=Z`` (alone or with
    ``min_psnr``) the same on the certified 5th percentile. Candidates are ranked on the
    ``holdout`` calls (selection) and the plan is certified on the ``certification`` calls
    (for text models, may hold other prompts); both default to ``calls`` with fresh seeds, and
    all three sets must have pairwise disjoint seeds. ``measure`` and ``certify``
    (``invardiff.certify.Measure``) replace the two held-out measurements. ``mode="reference"`` (the default without a target;
    2 x ``len(calls)`` runs): the paper's rules; ``preset`` is ``"fast"`` (default) or
    ``"slow"``; ``params`` override single values (``q_step``, ``q_attn``, ``nonskip``,
    ``flag_index``, ...).
    """
    transformer = getattr(pipeline, "transformer", pipeline)
    arch = detect_architecture(transformer)
    mode = calibration_mode(mode, target_speedup, min_psnr, preset, params, min_psnr_p5)
    settings = CalibrationParams.resolve(arch, preset, **params)
    if not calls:
        raise ValueError("calibration needs at least one call")
    steps = _shared(calls, "num_inference_steps")
    if steps is None:
        raise ValueError("calibration calls must set num_inference_steps")
    run = runner or pipeline_runner(pipeline)
    say = progress or (lambda message: None)
    if mode == "budget":
        from .budget_calibration import calibrate_to_budget

        targets = {"target_speedup": target_speedup, "min_psnr": min_psnr, "min_psnr_p5": min_psnr_p5}
        return calibrate_to_budget(pipeline, transformer, run, calls, steps, settings, targets=targets,
                                   holdout=holdout, certification=certification, measure=measure, certify=certify,
                                   model_id=model_id, revision=revision, say=say)  # fmt: skip

    phase1 = []
    for i, call in enumerate(calls):
        say(f"phase 1: trajectory {i + 1}/{len(calls)}")
        phase1.append(trajectory_stats(transformer, run, call, i, steps, settings))
    provisional = provisional_flags(merge_scores(phase1), settings)
    phase2 = []
    for i, call in enumerate(calls):
        say(f"phase 2: trajectory {i + 1}/{len(calls)}")
        phase2.append(trajectory_stats(transformer, run, call, i, steps, settings, provisional=provisional))
    return build_plan(pipeline, calls, settings, phase1, phase2, model_id=model_id, revision=revision)


def build_plan(
    pipeline,
    calls: list[dict[str, Any]],
    params: CalibrationParams,
    phase1: list[TrajectoryStats],
    phase2: list[TrajectoryStats],
    model_id: str | None = None,
    revision: str | None = None,
) -> CachePlan:
    """Turn both phases' statistics into the final plan with its target and provenance."""
    provisional = provisional_flags(merge_scores(phase1), params)
    gate, modules = final_flags(merge_scores(phase2), provisional, params)
    first = min(phase1, key=lambda s: s.index)
    if any(s.timesteps != first.timesteps for s in phase2):
        raise ValueError("phase 2 ran another timestep schedule than phase 1: the trajectories are not deterministic")
    target = describe_target(pipeline, calls, first.timesteps, model_id=model_id, revision=revision)
    calibration = provenance(calls, params)
    return CachePlan(
        arch=params.arch,
        step_gate=gate.numpy(),
        modules={k: v.numpy() for k, v in modules.items()},
        target=target,
        geometry=first.geometry,
        calibration=calibration,
    )


def calibration_mode(
    mode: str | None,
    target_speedup: float | None,
    min_psnr: float | None,
    preset: str | None,
    params: dict,
    min_psnr_p5: float | None = None,
) -> str:
    """``"budget"`` or ``"reference"``; ValueError for a target the mode cannot take."""
    from .budget import check_targets

    targeted = any(v is not None for v in (target_speedup, min_psnr, min_psnr_p5))
    mode = mode or ("budget" if targeted else "reference")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "reference" and targeted:
        raise ValueError("target_speedup and min_psnr need mode='budget' (the reference rules take quantiles)")
    if mode == "budget":
        check_targets(target_speedup, min_psnr, min_psnr_p5)
        check_no_rules(params, preset)
    return mode


def check_no_rules(params: dict, preset: str | None) -> None:
    """A budget replaces the reference rules: ValueError for a rule parameter other than
    ``flag_index``, or a ``preset``."""
    rules = sorted(set(params) - {"flag_index"}) + (["preset"] if preset else [])
    if rules:
        raise ValueError(f"{', '.join(rules)} apply to mode='reference' only, not to a budget")


def provenance(calls: list[dict[str, Any]], params: CalibrationParams) -> dict[str, Any]:
    """What a plan records about its calibration: version, parameters, calls, libraries."""
    return {
        "calibrator_version": CALIBRATOR_VERSION,
        "params": params.to_json(),
        "trajectories": len(calls),
        "calls": [_jsonable(c) for c in calls],
        "libraries": library_versions(),
    }


def describe_target(
    pipeline, calls: list[dict[str, Any]], timesteps: list[float], model_id=None, revision=None
) -> PlanTarget:
    """The :class:`PlanTarget` of a calibration: what the plan is valid for."""
    transformer = getattr(pipeline, "transformer", pipeline)
    scheduler = getattr(pipeline, "scheduler", None)
    config = getattr(pipeline, "config", None) or getattr(transformer, "config", {})
    name = model_id or getattr(config, "_name_or_path", None) or (config.get("_name_or_path") if isinstance(config, dict) else None)
    height = _setting(pipeline, calls, "height") or _builtin_resolution(pipeline)
    width = _setting(pipeline, calls, "width") or height
    guidance = _setting(pipeline, calls, "guidance_scale")
    return PlanTarget(
        model_id=name or type(transformer).__name__,
        revision=revision or getattr(pipeline, "revision", None),
        pipeline=type(pipeline).__name__ if scheduler is not None else None,
        scheduler=type(scheduler).__name__ if scheduler is not None else None,
        scheduler_config_hash=scheduler_config_hash(scheduler) if scheduler is not None else None,
        timesteps=tuple(timesteps),
        steps=len(timesteps),
        height=height,
        width=width,
        guidance=None if guidance is None else float(guidance),
        dtype=model_dtype(transformer),
    )


def _builtin_resolution(pipeline) -> int | None:
    transformer = getattr(pipeline, "transformer", None)
    size = getattr(getattr(transformer, "config", None), "sample_size", None)
    vae = getattr(pipeline, "vae", None)
    blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
    scale = 2 ** (len(blocks) - 1) if blocks else 1
    default = getattr(pipeline, "default_sample_size", None)  # FluxPipeline: latent side / vae scale
    if isinstance(default, int) and size is None:
        size, scale = default, getattr(pipeline, "vae_scale_factor", 1)
    return getattr(pipeline, "resolution", None) or (int(size) * scale if isinstance(size, int) else None)


def _setting(pipeline, calls: list[dict[str, Any]], key: str) -> Any:
    """The calls' shared value of ``key``, else the pipeline's default for it (None if none)."""
    value = _shared(calls, key)
    if value is not None or getattr(pipeline, "scheduler", None) is None:
        return value
    parameter = inspect.signature(type(pipeline).__call__).parameters.get(key)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


def _shared(calls: list[dict[str, Any]], key: str) -> Any:
    values = {json.dumps(_jsonable(c.get(key)), sort_keys=True) for c in calls}
    if len(values) > 1:
        raise ValueError(f"calibration calls disagree on {key!r}; a plan is valid for one value")
    return calls[0].get(key)


def library_versions() -> dict[str, str]:
    """The versions of the libraries a calibration depends on."""
    import diffusers

    from . import __version__

    return {"invardiff": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}
