"""Plan intake: plan bytes checked against the model they are published for, with lineage.

Light (no SQLAlchemy): publishing (:mod:`registry.publishing`) stores what this accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from invardiff import CachePlan, PlanError, __version__
from invardiff.official import from_official, is_official

from .checkpoints import TARGET_SETTINGS, checkpoint_id
from .errors import InvalidInput
from .matching import ModelInfo, Resolution, TargetKey
from .stamps import iso, user, utcnow
from .validation import MAX_PLAN_BYTES, check_settings, check_target, check_text, parse_json


def load_plan(
    data: bytes,
    path: Path,
    model: ModelInfo,
    resolution: Resolution | None,
    steps: int | None,
) -> tuple[CachePlan, dict[str, Any]]:
    """Read plan bytes for ``model`` (``path`` names them): imported reference plans take the
    model's identity. Returns the plan and its lineage record.

    The target is validated, never rewritten: the engine's :class:`~invardiff.plan.PlanTarget`
    is canonical already, so publishing keeps the plan's bytes and sha256.
    """
    if len(data) > MAX_PLAN_BYTES:
        raise InvalidInput(f"plan {path} is {len(data)} bytes; the limit is {MAX_PLAN_BYTES} bytes")
    document = parse_json(data, str(path))
    imported = is_official(document)
    overrides: dict[str, Any] = {}
    if imported:
        overrides = {"model_id": checkpoint_id(model.source), "revision": model.revision}
        if resolution is not None:
            overrides.update(height=resolution.height, width=resolution.width)
    try:
        if imported:
            plan = from_official(document, name=path.stem, **overrides)
        else:
            plan = CachePlan.from_json(document)
    except (PlanError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidInput(f"{path}: {detail}") from None
    check_plan(plan, path)
    target = plan.target
    if plan.arch != model.arch:
        raise InvalidInput(
            f"{path.name} is a {plan.arch} plan but model {model.name} is {model.arch}"
        )
    if not imported:
        accepted = {model.name, model.source, checkpoint_id(model.source)}
        if target.model_id not in accepted:
            raise InvalidInput(
                f"{path.name} was calibrated for {target.model_id!r}, not for model {model.name} ({model.source})"
            )
        if target.revision is not None and target.revision != model.revision:
            raise InvalidInput(
                f"{path.name} is for revision {target.revision} but model {model.name} is at "
                f"{model.revision or 'no pinned revision'}"
            )
        if target.revision is None and model.revision is not None:
            # Accepting it would let the same bytes land under several revisions.
            raise InvalidInput(
                f"{path.name} records no checkpoint revision but model {model.name} is pinned to "
                f"{model.revision}: recalibrate against that revision, or set the plan's "
                f"target.revision to {model.revision} if it was calibrated on it"
            )
    if target.height is None or target.width is None:
        raise InvalidInput(f"{path.name} records no resolution; publish needs one")
    recorded = Resolution(width=target.width, height=target.height)
    if resolution is not None and resolution != recorded:
        raise InvalidInput(f"--resolution {resolution} does not match the plan's {recorded}")
    if steps is not None and steps != plan.steps:
        raise InvalidInput(f"--steps {steps} does not match the plan's {plan.steps} steps")
    lineage = {
        "source_file": path.name,
        "imported": imported,
        "model_alias": model.name,
        "calibration": plan.calibration,
        "published_by": user(),
        "published_at": iso(utcnow()),
        "invardiff_version": __version__,
    }
    return plan, lineage


def check_plan(plan: CachePlan, path: Path) -> None:
    """Refuse a plan whose target or records the registry cannot store (``path`` names it)."""
    target = plan.target
    try:
        check_text(target.model_id, "target.model_id", 512)
        check_settings({name: getattr(target, name) for name in ("revision", *TARGET_SETTINGS)})
        if not isinstance(plan.calibration, dict) or not isinstance(plan.extras, dict):
            raise InvalidInput("calibration and extras must be JSON objects")
        job_key = plan.calibration.get("job_key")
        if job_key is not None:
            check_text(job_key, "calibration.job_key", 64)
    except InvalidInput as exc:
        raise InvalidInput(f"{path.name}: {exc}") from None
    try:
        plan.to_bytes()
    except (ValueError, TypeError) as exc:  # e.g. a timestep written as "inf"
        raise InvalidInput(f"{path.name}: cannot be stored as canonical JSON: {exc}") from None


def plan_target_key(model: ModelInfo, plan: CachePlan) -> TargetKey:
    """The validated, canonical matching key of ``plan`` published for ``model``."""
    settings = {name: getattr(plan.target, name) for name in TARGET_SETTINGS}
    values = check_target(
        {"source": model.source, "revision": model.revision, **settings, "steps": plan.steps}
    )
    return TargetKey(**values)



def as_dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a dict, else an empty one."""
    return value if isinstance(value, dict) else {}


