"""Which plans are due for recalibration, and operators' marks (``mark-stale``).

Detection is a read-only query over the registry database (no Ray, no torch): for every
model alias, each sampling setup it has plans for (the target without its checkpoint
revision) is looked at through its latest plan, and is due when any of these holds:

- ``revision_changed``: the alias names another checkpoint revision than the one of its
  newest plan for the setup (there is no plan for the alias's current revision yet);
- ``calibrator_changed``: the plan records another calibrator version than this one;
- ``library_changed``: the plan records another major.minor version of diffusers or torch;
- ``too_old``: the target was last calibrated (its plan published, or a calibration job for
  it succeeded) longer than the policy's maximum age ago;
- ``marked``: an operator marked the plan with ``mark-stale`` after its last calibration;
- ``revoked``: the setup has no ready plan, and its newest plan was revoked (nothing serves
  it: whatever ``--max-age``).

Plans without a calibration record (imported reference plans) are only checked for
revision, age and marks. A setup served by several aliases of one checkpoint is listed once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from .errors import InvalidInput
from .matching import READY, REVOKED, ModelInfo, TargetKey
from .models import CalibrationJob, ModelAlias, PlanTarget, PlanVersion
from .rows import model_info, target_key
from .stamps import aware, iso, user, utcnow

REASONS = (
    "revision_changed",
    "calibrator_changed",
    "library_changed",
    "too_old",
    "marked",
    "revoked",
)
TRACKED_LIBRARIES = ("diffusers", "torch")
_SETUP_FIELDS = tuple(f for f in TargetKey.__dataclass_fields__ if f not in ("source", "revision"))


@dataclass(frozen=True)
class Policy:
    """What "stale" is measured against: the running versions, a maximum age, the time now.

    ``versions`` holds ``calibrator`` and the :data:`TRACKED_LIBRARIES` versions.
    """

    versions: dict[str, str]
    max_age: timedelta | None = None
    now: datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class PlanState:
    """The latest plan of one setup of one model alias, with what the rules look at."""

    model: ModelInfo
    target: TargetKey
    version: int
    sha256: str
    created_at: datetime
    calibrated_at: datetime  # later of the plan's creation and the target's last succeeded job
    calibration: dict[str, Any]  # the plan's calibration record (lineage)
    marked_at: datetime | None = None
    marked_by: str | None = None
    marked_reason: str | None = None
    job_key: str | None = None  # the calibration job that produced the plan
    job_request: dict[str, Any] | None = None
    status: str = READY  # revoked: the setup's newest plan, when none of its plans is ready
    revoked: dict[str, Any] | None = None  # {"at", "by"} of a revoked plan

    def wanted(self) -> TargetKey:
        """The target a recalibration produces: this setup at the alias's checkpoint."""
        setup = {name: getattr(self.target, name) for name in _SETUP_FIELDS}
        return TargetKey(source=self.model.source, revision=self.model.revision, **setup)


@dataclass(frozen=True)
class DuePlan:
    """A setup due for recalibration: its latest plan and why (reason -> detail)."""

    plan: PlanState
    reasons: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "model": plan.model.name,
            "target": plan.wanted().to_json(),
            "resolution": str(plan.target.resolution),
            "plan": {
                "sha256": plan.sha256,
                "version": plan.version,
                "revision": plan.target.revision,
                "created_at": iso(plan.created_at),
                "calibrated_at": iso(plan.calibrated_at),
                "job_key": plan.job_key,
                "status": plan.status,
            },
            "reasons": sorted(self.reasons, key=REASONS.index),
            "details": self.reasons,
        }


def minor(version: str | None) -> str | None:
    """``major.minor`` of a version string (``2.13.0+cu128`` -> ``2.13``)."""
    match = re.match(r"^\s*(\d+)\.(\d+)", version or "")
    return f"{match[1]}.{match[2]}" if match else None


def stale_reasons(plan: PlanState, policy: Policy) -> dict[str, Any]:
    """The rules of the module docstring for one plan; empty when it is fresh."""
    reasons: dict[str, Any] = {}
    if plan.target.revision != plan.model.revision:
        reasons["revision_changed"] = {"plan": plan.target.revision, "model": plan.model.revision}
        return reasons  # a new checkpoint: nothing else about the old plan matters
    if plan.status == REVOKED:
        reasons["revoked"] = plan.revoked or {}
        return reasons  # nothing serves the setup: its age or versions do not matter
    recorded = plan.calibration.get("calibrator_version")
    if recorded is not None and str(recorded) != str(policy.versions.get("calibrator")):
        reasons["calibrator_changed"] = {"plan": recorded, "now": policy.versions.get("calibrator")}
    libraries = plan.calibration.get("libraries")
    if isinstance(libraries, dict):
        changed = {
            name: {"plan": libraries[name], "now": policy.versions.get(name)}
            for name in TRACKED_LIBRARIES
            if name in libraries and minor(libraries[name]) != minor(policy.versions.get(name))
        }
        if changed:
            reasons["library_changed"] = changed
    age = policy.now - aware(plan.calibrated_at)
    if policy.max_age is not None and age > policy.max_age:
        reasons["too_old"] = {"age_days": round(age / timedelta(days=1), 2)}
    marked_at = aware(plan.marked_at)
    if marked_at is not None and marked_at >= aware(plan.calibrated_at):
        reasons["marked"] = {
            "at": iso(marked_at),
            "by": plan.marked_by,
            "reason": plan.marked_reason,
        }
    return reasons


def find_due(session: Session, policy: Policy) -> list[DuePlan]:
    """Every setup due for recalibration, by model alias and target (read-only)."""
    due = []
    seen: set[str] = set()
    for plan in plan_states(session):
        wanted = plan.wanted().key_hash
        reasons = stale_reasons(plan, policy)
        if reasons and wanted not in seen:
            seen.add(wanted)
            due.append(DuePlan(plan, reasons))
    return due


def plan_states(session: Session) -> list[PlanState]:
    """For each model alias and setup, the state of its latest plan (see the module rules)."""
    models = session.scalars(select(ModelAlias).order_by(ModelAlias.name)).all()
    sources = {m.source for m in models}
    targets = session.scalars(
        select(PlanTarget)
        .where(PlanTarget.source.in_(sources))
        .options(selectinload(PlanTarget.versions))
        .order_by(PlanTarget.id)
    ).all()
    last_job = dict(
        session.execute(
            select(CalibrationJob.target_id, func.max(CalibrationJob.finished_at))
            .where(CalibrationJob.status == "succeeded", CalibrationJob.target_id.is_not(None))
            .group_by(CalibrationJob.target_id)
        ).all()
    )
    job_ids = {v.calibration_job_id for t in targets for v in t.versions if v.calibration_job_id}
    jobs = {
        job.id: job
        for job in session.scalars(select(CalibrationJob).where(CalibrationJob.id.in_(job_ids)))
    }
    states = []
    for model_row in models:
        model = model_info(model_row)
        newest: dict[tuple, PlanState] = {}
        for target in targets:
            latest = _latest(target) or _newest_revoked(target)
            if target.source != model.source or latest is None:
                continue
            state = _state(model, target, latest, last_job.get(target.id), jobs)
            current = target.revision == model.revision
            if not (current or _made_for(state, latest, model.name)):
                continue
            setup = tuple(getattr(target, name) for name in _SETUP_FIELDS)
            known = newest.get(setup)
            if known is None or _rank(state, model) > _rank(known, model):
                newest[setup] = state
        states += sorted(newest.values(), key=lambda s: (s.target.resolution, str(s.target)))
    return states


def _latest(target: PlanTarget) -> PlanVersion | None:
    ready = [v for v in target.versions if v.status == READY]
    return max(ready, key=lambda v: v.version) if ready else None


def _newest_revoked(target: PlanTarget) -> PlanVersion | None:
    """A target without a ready version: its newest revoked one (None when there is none)."""
    revoked = [v for v in target.versions if v.status == REVOKED]
    return max(revoked, key=lambda v: v.version) if revoked else None


def _state(
    model: ModelInfo,
    target: PlanTarget,
    latest: PlanVersion,
    last_job_at: datetime | None,
    jobs: dict[int, CalibrationJob],
) -> PlanState:
    job = jobs.get(latest.calibration_job_id) if latest.calibration_job_id else None
    calibration = (latest.lineage or {}).get("calibration") or {}
    created = aware(latest.created_at)
    return PlanState(
        model=model,
        target=target_key(target),
        version=latest.version,
        sha256=latest.sha256,
        created_at=created,
        calibrated_at=max(created, aware(last_job_at) or created),
        calibration=calibration if isinstance(calibration, dict) else {},
        marked_at=aware(latest.stale_marked_at),
        marked_by=latest.stale_marked_by,
        marked_reason=latest.stale_reason,
        job_key=job.job_key if job else calibration.get("job_key"),
        job_request=job.request if job else None,
        status=latest.status,
        revoked=(
            {k: (latest.lineage or {}).get(f"revoked_{k}") for k in ("at", "by")}
            if latest.status == REVOKED
            else None
        ),
    )


def _made_for(state: PlanState, latest: PlanVersion, name: str) -> bool:
    """Whether an older revision's plan was published or calibrated for alias ``name``."""
    lineage = latest.lineage or {}
    return lineage.get("model_alias") == name or (state.job_request or {}).get("model") == name


def _rank(state: PlanState, model: ModelInfo) -> tuple:
    """The plan that speaks for a setup: the alias's current revision first, then the newest."""
    return (state.target.revision == model.revision, state.created_at, state.version)


# ---- marks --------------------------------------------------------------------------------
def mark_stale(
    registry, ref: str, model_name: str | None = None, reason: str | None = None
) -> dict[str, Any]:
    """Mark plan ``ref`` (the latest ready version of its target) for recalibration."""
    model = registry.model(model_name) if model_name else None
    with registry.session() as session:
        row = registry.version_by_ref(session, ref, model)
        latest = _latest(row.target)
        if latest is None or latest.id != row.id:
            now = f"v{latest.version} ({latest.sha256[:12]})" if latest else "no ready version"
            raise InvalidInput(
                f"plan {row.sha256[:12]} is v{row.version} ({row.status}); its target's latest "
                f"ready plan is {now}: only the latest plan is recalibrated, mark that one"
            )
        row.stale_marked_at = utcnow()
        row.stale_marked_by = user()
        row.stale_reason = reason
        return {
            "sha256": row.sha256,
            "version": row.version,
            "target": target_key(row.target).to_json(),
            "marked_at": iso(row.stale_marked_at),
            "marked_by": row.stale_marked_by,
            "reason": reason,
        }
