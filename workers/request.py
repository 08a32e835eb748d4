"""The canonical calibration request and its ``job_key``.

A :class:`CalibrationRequest` is plain JSON data: the checkpoint (source and revision), the
target (pipeline, resolution, steps, guidance), the resolved calibration parameters, every
call (condition x seed), the prompt set's sha256, and the calibrator and library versions.
``job_key`` is the sha256 of its canonical JSON without the presentation fields (model alias
name, validation), so the same computation always has the same key whatever alias or
validation it was asked with. :func:`build_request` derives it from a registry model alias.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from registry.errors import InvalidInput
from registry.matching import ModelInfo, Resolution, canonical
from registry.validation import MAX_STEPS, check_number, read_regular_file, shown

from .pipelines import builtin_name, check_resolution, is_class_conditional

CALIBRATION_SEED = 1000  # calibration call i uses seed CALIBRATION_SEED + i
VALIDATION_SEED = 900_000  # held-out: validation sample i uses VALIDATION_SEED + i
MAX_TRAJECTORIES = 4096
MIN_STEPS = 3  # the change scores compare three consecutive steps
MAX_REPEATS = 100
# Prompt files (--prompts): regular UTF-8 text files within these limits.
MAX_PROMPT_FILE_BYTES = 1024 * 1024
MAX_PROMPT_CHARS = 2000
MAX_PROMPTS = MAX_TRAJECTORIES
DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red fox in fresh snow, golden hour",
    "a bowl of ramen on a wooden table, top view",
    "an old lighthouse on a cliff in a storm",
    "a watercolor painting of a city street at night",
    "a close-up portrait of an elderly fisherman",
    "a futuristic car parked in a neon-lit alley",
    "a field of sunflowers under a blue sky",
)
# ImageNet classes for DiT checkpoints (those of the DiT paper's sample grid).
IMAGENET_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)
DIGIT_LABELS = tuple(range(10))
_PROMPT_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_UNKEYED = ("model", "validation")
_UNSET_UNKEYED = ("refresh", "prompts")


@dataclass(frozen=True)
class CalibrationRequest:
    """Everything that determines a calibration's result (see the module docstring)."""

    model: str
    source: str
    revision: str | None
    arch: str
    pipeline: str | None
    width: int
    height: int
    steps: int
    guidance: float | None
    dtype: str | None
    params: dict[str, Any]
    calls: list[dict[str, Any]]
    prompts_sha256: str | None
    versions: dict[str, str]
    # The prompt set, stored once: in ``to_json`` each call names its prompt by index here.
    prompts: list[str] | None = None
    validation: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, float] | None = None  # {"target_speedup": X} or {"min_psnr": Y, "min_psnr_p5": Z}
    # A scheduled refresh of an unchanged setup (age, an operator's mark): "<plan sha256>@<time
    # it was calibrated>", so that the job is new and computed afresh, not the one that made it.
    refresh: str | None = None

    @property
    def job_key(self) -> str:
        """sha256 of the canonical request (without the alias name and validation; without
        ``refresh`` and ``prompts`` when unset, so that requests from before these fields keep
        their keys)."""
        keyed = {
            k: v
            for k, v in self.to_json().items()
            if k not in _UNKEYED and not (k in _UNSET_UNKEYED and v is None)
        }
        return hashlib.sha256(canonical(keyed)).hexdigest()

    @property
    def resolution(self) -> Resolution:
        return Resolution(width=self.width, height=self.height)

    def shard_key(self, phase: int, index: int) -> str:
        """Object-store key of one trajectory's statistics."""
        return f"{shard_prefix(self.job_key, phase)}{index}"

    def to_json(self) -> dict[str, Any]:
        """Canonical JSON; with a prompt set, calls carry ``prompt_index`` instead of the text."""
        data = json.loads(canonical(asdict(self)))
        if self.prompts is not None:
            index = {prompt: i for i, prompt in enumerate(self.prompts)}
            data["calls"] = [_indexed(call, index) for call in data["calls"]]
            if data["validation"].get("calls"):
                data["validation"]["calls"] = [
                    _indexed(call, index) for call in data["validation"]["calls"]
                ]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CalibrationRequest:
        """The request of :meth:`to_json` (calls get their prompt text back)."""
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        prompts = values.get("prompts")
        if prompts is not None:
            values["calls"] = [_expanded(call, prompts) for call in values["calls"]]
            validation = dict(values.get("validation") or {})
            if validation.get("calls"):
                validation["calls"] = [_expanded(call, prompts) for call in validation["calls"]]
            values["validation"] = validation
        return cls(**values)


def _indexed(call: dict[str, Any], index: dict[str, int]) -> dict[str, Any]:
    """``call`` naming its prompt by its index in the prompt set (text kept if not in it)."""
    if call.get("prompt") not in index:
        return call
    rest = {k: v for k, v in call.items() if k != "prompt"}
    return {**rest, "prompt_index": index[call["prompt"]]}


def _expanded(call: dict[str, Any], prompts: list[str]) -> dict[str, Any]:
    if "prompt_index" not in call:
        return call
    rest = {k: v for k, v in call.items() if k != "prompt_index"}
    return {**rest, "prompt": prompts[call["prompt_index"]]}


def shard_prefix(job_key: str, phase: int) -> str:
    """``jobs/<job_key>/phase-<p>/``: where a job's statistics of one phase live."""
    return f"jobs/{job_key}/phase-{phase}/"


def library_versions() -> dict[str, str]:
    """The calibrator and library versions a result depends on."""
    from invardiff.calibration import CALIBRATOR_VERSION
    from invardiff.calibration import library_versions as libraries

    return {"calibrator": CALIBRATOR_VERSION, **libraries()}


def read_prompts(path: Path) -> tuple[list[str], str]:
    """Non-empty lines of a prompt file and the sha256 of the prompt set.

    The file must be a regular UTF-8 text file of at most :data:`MAX_PROMPT_FILE_BYTES`
    bytes (read without blocking and never past the limit), with at most
    :data:`MAX_PROMPTS` prompts of at most :data:`MAX_PROMPT_CHARS` characters and no
    control characters but tabs; anything else is :class:`InvalidInput`.
    """
    data = read_regular_file(path, MAX_PROMPT_FILE_BYTES, "prompt file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"prompt file {path} is not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        prompt = line.strip()
        if not prompt:
            continue
        if _PROMPT_CONTROL.search(prompt):
            raise InvalidInput(f"prompt file {path} line {number}: a control character (binary?)")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidInput(
                f"prompt file {path} line {number} has {len(prompt)} characters; "
                f"the limit is {MAX_PROMPT_CHARS}"
            )
        prompts.append(prompt)
        if len(prompts) > MAX_PROMPTS:
            raise InvalidInput(f"prompt file {path} has over {MAX_PROMPTS} prompts")
    if not prompts:
        raise InvalidInput(f"prompt file {path} has no prompts")
    return prompts, prompt_set_sha256(prompts)


def prompt_set_sha256(prompts: list[str] | tuple[str, ...]) -> str:
    """sha256 of the prompt set (canonical JSON list)."""
    return hashlib.sha256(canonical(list(prompts))).hexdigest()


def derive_calls(
    conditions: list[Any],
    count: int,
    first_seed: int,
    base: dict[str, Any],
    text: bool,
) -> list[dict[str, Any]]:
    """Call ``i``: condition ``i mod len(conditions)`` with seed ``first_seed + i``."""
    calls = []
    for i in range(count):
        condition = conditions[i % len(conditions)]
        cond = {"prompt": condition} if text else {"class_labels": [condition]}
        calls.append({**cond, **base, "seed": first_seed + i})
    return calls


def build_request(
    model: ModelInfo,
    resolution: Resolution | None = None,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    preset: str | None = None,
    params: dict[str, Any] | None = None,
    trajectories: int = 8,
    prompts_file: Path | None = None,
    validate: int = 8,
    repeats: int = 3,
    budget: dict[str, float] | None = None,
) -> CalibrationRequest:
    """The canonical request for calibrating ``model`` (a registry alias).

    Bad input (impossible resolution, parameters out of range, missing prompt file, a
    checkpoint snapshot missing from the local cache) raises a :class:`RegistryError`
    before anything is computed or stored.
    """
    from invardiff.calibration import CalibrationParams

    _check_count(trajectories, "--trajectories", 1, MAX_TRAJECTORIES)
    _check_count(validate, "--validate", 0, MAX_TRAJECTORIES)
    _check_count(repeats, "--repeats", 1, MAX_REPEATS)
    if resolution is None:
        if model.width is None or model.height is None:
            raise InvalidInput(f"model {model.name} has no default resolution: give one")
        resolution = Resolution(width=model.width, height=model.height)
    check_resolution(model, resolution)
    steps = steps or model.steps
    if not steps:
        raise InvalidInput(f"model {model.name} has no default step count: pass --steps")
    _check_count(steps, "--steps", MIN_STEPS, MAX_STEPS)
    guidance = guidance if guidance is not None else _default_guidance(model)
    if guidance is not None:
        guidance = check_number(guidance, "--guidance")
        if guidance < 0:
            raise InvalidInput(f"--guidance must be at least 0, got {guidance:g}")
    check_params(params or {})
    try:
        resolved = CalibrationParams.resolve(model.arch, preset, **(params or {}))
    except (ValueError, TypeError) as exc:
        raise InvalidInput(str(exc)) from None
    budget = check_budget(budget, preset, params or {})
    if budget and budget.get("target_speedup", 0.0) > steps / 2:  # only 2 of the steps computed
        raise InvalidInput(
            f"--target-speedup {budget['target_speedup']:g} is unreachable: at most "
            f"{steps / 2:g}x with {steps} steps"
        )
    text = not is_class_conditional(model)
    prompts_sha256, prompt_set = None, None
    if text:
        prompts, prompts_sha256 = (
            read_prompts(prompts_file)
            if prompts_file is not None
            else (list(DEFAULT_PROMPTS), prompt_set_sha256(DEFAULT_PROMPTS))
        )
        conditions: list[Any] = prompts
        prompt_set = prompts
    else:
        if prompts_file is not None:
            raise InvalidInput(f"model {model.name} is class-conditional: --prompts does not apply")
        conditions = list(DIGIT_LABELS if builtin_name(model.source) else IMAGENET_LABELS)
    base: dict[str, Any] = {"num_inference_steps": steps}
    if guidance is not None:
        base["guidance_scale"] = guidance
    if text:
        base.update(height=resolution.height, width=resolution.width)
    calls = derive_calls(conditions, trajectories, CALIBRATION_SEED, base, text)
    held_out = derive_calls(conditions, validate, VALIDATION_SEED, base, text)
    return CalibrationRequest(
        model=model.name,
        source=model.source,
        revision=model.revision,
        arch=model.arch,
        pipeline=model.pipeline,
        width=resolution.width,
        height=resolution.height,
        steps=steps,
        guidance=guidance,
        dtype=model.dtype,
        params=resolved.to_json(),
        calls=calls,
        prompts_sha256=prompts_sha256,
        versions=library_versions(),
        validation={"calls": held_out, "repeats": repeats},
        budget=budget,
        prompts=prompt_set,
    )


def _check_count(value: Any, what: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{what} must be an integer within {low}..{high}, got {shown(value)}")


def check_params(params: dict[str, Any]) -> None:
    """Refuse calibration parameters of the wrong type or range before any work.

    The engine's :meth:`CalibrationParams.validate` checks the quantile ranges; this adds
    the types (``--set`` values are JSON): finite numbers for ``q_*`` and ``nonskip``, a
    boolean ``correct_flux_step_gate``, a string ``flag_index``, and ``max_consecutive``
    null or an integer within 1..``MAX_STEPS``.
    """
    for key, value in params.items():
        if key.startswith("q_") or key == "nonskip":
            check_number(value, key)
        elif key == "correct_flux_step_gate" and not isinstance(value, bool):
            raise InvalidInput(f"{key} must be true or false, got {shown(value)}")
        elif key == "flag_index" and not isinstance(value, str):
            raise InvalidInput(f"{key} must be a string, got {shown(value)}")
        elif key == "max_consecutive" and value is not None:
            _check_count(value, key, 1, MAX_STEPS)


def check_budget(
    budget: dict[str, float] | None, preset: str | None, params: dict[str, Any]
) -> dict[str, float] | None:
    """Validate budget targets with the engine's own rules (``invardiff.budget``).

    A budget replaces the reference rules: only ``flag_index`` of the rule parameters applies.
    """
    budget = {k: float(v) for k, v in (budget or {}).items() if v is not None}
    if not budget:
        return None
    try:
        from invardiff.budget import check_targets
    except ImportError:
        raise InvalidInput(
            "budget targets need an invardiff with budget-targeted calibration (invardiff.budget)"
        ) from None
    try:
        check_targets(budget.get("target_speedup"), budget.get("min_psnr"), budget.get("min_psnr_p5"))
    except ValueError as exc:
        flags = str(exc).replace("target_speedup", "--target-speedup").replace("min_psnr", "--target-psnr")
        raise InvalidInput(flags.replace("_p5", "-p5")) from None
    from invardiff.calibration import check_no_rules

    try:
        check_no_rules(params, preset)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    return budget


def _default_guidance(model: ModelInfo) -> float | None:
    name = builtin_name(model.source)
    if name is not None:
        from invardiff.models import BUILTIN_MODELS

        return float(BUILTIN_MODELS[name]["guidance_scale"])
    return model.guidance
