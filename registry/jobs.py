"""Calibration job rows: idempotent by ``job_key``, leased by one driver at a time.

The fleet (``workers/``) computes; this module only persists (no Ray, no torch). A job's life:

- :func:`claim` inserts the row (``pending`` -> ``running``) or takes it over when it is
  ``pending``, ``failed``, ``cancelled``, or ``running`` under an expired lease (its driver
  died); a ``succeeded`` job is returned as is, a live lease held by another driver is
  reported as ``busy``. The database's unique ``job_key`` and the row lock make the claim
  atomic: two drivers never both hold a job.
- The holder renews its lease with :func:`heartbeat` (also recording shard progress) and ends
  with :func:`finish` or :func:`fail`; both refuse a holder that lost its lease.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .errors import Conflict, InvalidInput, NotFound
from .models import JOB_STATUSES, CalibrationJob, PlanTarget, PlanVersion
from .stamps import aware, iso, utcnow
from .validation import shown

DEFAULT_LEASE_SECONDS = 30.0
# ``gc`` deletes the stored statistics of jobs that failed longer ago than this.
DEFAULT_FAILED_JOB_AGE = timedelta(days=7)
ACQUIRED, SUCCEEDED, BUSY = "acquired", "succeeded", "busy"
_CLAIM_ATTEMPTS = 10


@dataclass(frozen=True)
class JobInfo:
    """A calibration job row as plain data."""

    job_key: str
    model: str
    status: str
    attempts: int
    request: dict[str, Any]
    progress: dict[str, Any]
    timings: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    lease_holder: str | None
    heartbeat_at: str | None
    lease_expires_at: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None

    def to_json(self, with_request: bool = True) -> dict[str, Any]:
        data = asdict(self)
        if not with_request:
            data.pop("request")
        return data


@dataclass(frozen=True)
class Claim:
    """The outcome of :func:`claim`: ``state`` is ``acquired``, ``succeeded`` or ``busy``."""

    state: str
    job: JobInfo
    inserted: bool


def job_info(row: CalibrationJob) -> JobInfo:
    """Plain data of a row."""
    return JobInfo(
        job_key=row.job_key,
        model=row.model,
        status=row.status,
        attempts=row.attempts,
        request=row.request,
        progress=row.progress or {},
        timings=row.timings or {},
        result=row.result,
        error=row.error,
        lease_holder=row.lease_holder,
        heartbeat_at=iso(row.heartbeat_at),
        lease_expires_at=iso(row.lease_expires_at),
        created_at=iso(row.created_at) or "",
        started_at=iso(row.started_at),
        finished_at=iso(row.finished_at),
    )


def lease_expired(row: CalibrationJob, now: datetime) -> bool:
    """Whether the row's lease has run out (no lease counts as expired)."""
    expires = aware(row.lease_expires_at)
    return expires is None or expires <= now


def _locked(session: Session, job_key: str) -> CalibrationJob | None:
    return session.scalar(
        select(CalibrationJob).where(CalibrationJob.job_key == job_key).with_for_update()
    )


def claim(
    registry,
    job_key: str,
    model: str,
    request: dict[str, Any],
    holder: str,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> Claim:
    """Insert or take over job ``job_key`` for ``holder`` (see the module docstring)."""
    for attempt in range(_CLAIM_ATTEMPTS):
        try:
            with registry.session() as session:
                now = utcnow()
                row = _locked(session, job_key)
                inserted = row is None
                if row is None:
                    row = CalibrationJob(job_key=job_key, model=model, request=request, lineage={})
                    session.add(row)
                elif row.status == SUCCEEDED:
                    return Claim(SUCCEEDED, job_info(row), False)
                elif (
                    row.status == "running"
                    and row.lease_holder != holder
                    and not lease_expired(row, now)
                ):
                    return Claim(BUSY, job_info(row), False)
                row.status = "running"
                row.attempts = (row.attempts or 0) + 1
                row.error = None
                row.lease_holder = holder
                row.heartbeat_at = now
                row.lease_expires_at = now + timedelta(seconds=lease_seconds)
                row.started_at = now
                row.finished_at = None
                session.flush()
                return Claim(ACQUIRED, job_info(row), inserted)
        except IntegrityError:  # another driver inserted the row first: read it again
            if attempt == _CLAIM_ATTEMPTS - 1:
                raise Conflict(f"job {job_key[:12]} kept conflicting; try again") from None
            time.sleep(0.02 * (attempt + 1))
    raise AssertionError("unreachable")


def ensure_job(registry, job_key: str, model: str, request: dict[str, Any]) -> tuple[JobInfo, bool]:
    """Insert job ``job_key`` as ``pending`` unless it exists; return it and whether it was new.

    For schedulers that enqueue work (``recalibrate --due``): inserting twice is harmless.
    """
    for attempt in range(_CLAIM_ATTEMPTS):
        try:
            with registry.session() as session:
                row = _locked(session, job_key)
                if row is not None:
                    return job_info(row), False
                row = CalibrationJob(job_key=job_key, model=model, request=request, lineage={})
                session.add(row)
                session.flush()
                return job_info(row), True
        except IntegrityError:
            if attempt == _CLAIM_ATTEMPTS - 1:
                raise Conflict(f"job {job_key[:12]} kept conflicting; try again") from None
    raise AssertionError("unreachable")


def _held(session: Session, job_key: str, holder: str) -> CalibrationJob:
    row = _locked(session, job_key)
    if row is None or row.status != "running" or row.lease_holder != holder:
        raise Conflict(
            f"job {job_key[:12]}: the lease of {holder} was taken over by another driver"
        )
    return row


def heartbeat(
    registry,
    job_key: str,
    holder: str,
    progress: dict[str, Any] | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> None:
    """Renew ``holder``'s lease (and record ``progress``); :class:`Conflict` if it was lost."""
    with registry.session() as session:
        row = _held(session, job_key, holder)
        now = utcnow()
        row.heartbeat_at = now
        row.lease_expires_at = now + timedelta(seconds=lease_seconds)
        if progress is not None:
            row.progress = progress


def finish(
    registry,
    job_key: str,
    holder: str,
    result: dict[str, Any],
    timings: dict[str, Any],
    progress: dict[str, Any],
    target_id: int | None = None,
) -> JobInfo:
    """Mark the job succeeded with its ``result`` (version, sha256, metrics) and release it."""
    with registry.session() as session:
        row = _held(session, job_key, holder)
        row.status = SUCCEEDED
        row.result, row.timings, row.progress = result, timings, progress
        row.target_id = target_id
        row.finished_at = utcnow()
        row.lease_holder = row.lease_expires_at = None
        session.flush()
        return job_info(row)


def fail(registry, job_key: str, holder: str, error: str, timings: dict[str, Any]) -> None:
    """Mark the job failed (a rerun resumes from its stored shards) if ``holder`` still has it."""
    try:
        with registry.session() as session:
            row = _held(session, job_key, holder)
            row.status = "failed"
            row.error = error[:2000]
            row.timings = timings
            row.finished_at = utcnow()
            row.lease_holder = row.lease_expires_at = None
    except Conflict:
        pass  # another driver owns it now: its outcome stands


def get_job(registry, ref: str) -> JobInfo:
    """One job by its key or a unique prefix of 6 to 64 hex digits."""
    ref = ref.lower()
    if not 6 <= len(ref) <= 64 or any(c not in "0123456789abcdef" for c in ref):
        raise InvalidInput(
            f"job reference {shown(ref)}: give at least 6 and at most 64 hex digits of its job key"
        )
    with registry.session() as session:
        rows = session.scalars(
            select(CalibrationJob).where(CalibrationJob.job_key.startswith(ref)).limit(2)
        ).all()
        if not rows:
            raise NotFound(f"no calibration job with key starting {ref}; `jobs list` shows them")
        if len(rows) > 1:
            raise InvalidInput(f"job reference {ref} is ambiguous: give more hex digits")
        return job_info(rows[0])


def failed_before(registry, cutoff: datetime) -> list[str]:
    """Keys of the jobs that failed before ``cutoff`` (their statistics are garbage)."""
    query = select(CalibrationJob.job_key).where(
        CalibrationJob.status == "failed", CalibrationJob.finished_at <= cutoff
    )
    with registry.session() as session:
        return sorted(session.scalars(query))


def drop_failed_statistics(
    registry, job_key: str, cutoff: datetime, drop: Callable[[], None]
) -> bool:
    """Run ``drop()`` (delete the job's stored statistics) under the job's row lock if the job
    is still failed since before ``cutoff``: a driver claiming it meanwhile waits, then computes
    the shards afresh. Returns whether ``drop`` ran."""
    with registry.session() as session:
        row = _locked(session, job_key)
        finished = None if row is None else aware(row.finished_at)
        if row is None or row.status != "failed" or finished is None or finished > cutoff:
            return False
        drop()
        return True


def list_jobs(registry, status: str | None = None, model: str | None = None) -> list[JobInfo]:
    """Jobs, newest first, optionally of one status and one model alias."""
    if status is not None and status not in JOB_STATUSES:
        raise InvalidInput(f"unknown job status {status!r} (known: {', '.join(JOB_STATUSES)})")
    query = select(CalibrationJob).order_by(CalibrationJob.id.desc())
    if status is not None:
        query = query.where(CalibrationJob.status == status)
    if model is not None:
        query = query.where(CalibrationJob.model == model)
    with registry.session() as session:
        return [job_info(row) for row in session.scalars(query)]


def add_version_metrics(
    registry, sha256: str, target_key_hash: str, metrics: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """Merge measured ``metrics`` into a version's stored metrics (existing keys win).

    Returns the version's target id and its metrics.
    """
    with registry.session() as session:
        row = session.scalar(
            select(PlanVersion)
            .join(PlanTarget)
            .where(PlanTarget.key_hash == target_key_hash, PlanVersion.sha256 == sha256)
            .with_for_update()
        )
        if row is None:
            raise NotFound(f"no plan version {sha256[:12]} for target {target_key_hash[:12]}")
        row.metrics = {**metrics, **(row.metrics or {})}
        return row.target_id, dict(row.metrics)


MAX_HISTORY = 500  # events kept per job (the oldest go first)


def record(registry, job_key: str, event: str, detail: str = "", **extra: Any) -> None:
    """Append an event (attempt, worker or node lost, damaged shard, error, reset, ...) with
    its UTC timestamp to the job's history (kept in the row's ``lineage``)."""
    with registry.session() as session:
        row = _locked(session, job_key)
        if row is None:
            return
        entry = {"at": iso(utcnow()), "event": event, "attempt": row.attempts, **extra}
        if detail:
            entry["detail"] = detail[:2000]
        events = [*(row.lineage or {}).get("history", []), entry][-MAX_HISTORY:]
        row.lineage = {**(row.lineage or {}), "history": events}


def history(registry, job_key: str) -> list[dict[str, Any]]:
    """The job's events, oldest first (see :func:`record`)."""
    with registry.session() as session:
        row = session.scalar(select(CalibrationJob).where(CalibrationJob.job_key == job_key))
        return list(((row.lineage or {}) if row is not None else {}).get("history", []))


def reset(registry, ref: str) -> JobInfo:
    """Put job ``ref`` (a key or prefix) back to ``pending`` so that the next ``calibrate`` of
    its request computes it again: its error, lease, progress and result are cleared, its
    attempts and history kept. A job running under a live lease is refused (:class:`Conflict`).
    """
    job_key = get_job(registry, ref).job_key
    with registry.session() as session:
        row = _locked(session, job_key)
        assert row is not None
        if row.status == "running" and not lease_expired(row, utcnow()):
            raise Conflict(
                f"job {job_key[:12]} is running under {row.lease_holder}'s live lease: "
                "stop that driver or wait for its lease to expire"
            )
        entry = {"at": iso(utcnow()), "event": "reset", "attempt": row.attempts,
                 "detail": f"was {row.status}"}  # fmt: skip
        events = [*(row.lineage or {}).get("history", []), entry][-MAX_HISTORY:]
        row.lineage = {**(row.lineage or {}), "history": events}
        row.status = "pending"
        row.error = row.result = row.lease_holder = row.lease_expires_at = None
        row.progress, row.finished_at = {}, None
        session.flush()
        return job_info(row)
