"""Scheduled recalibration: turn the registry's due plans into calibration jobs and submit them.

``recalibrate_due`` asks :mod:`registry.staleness` which setups are due, derives each one's
:class:`~workers.request.CalibrationRequest` (the request of the job that made the plan,
re-aimed at the alias's current checkpoint and the running library versions; or, for a plan
without a job, :func:`~workers.request.build_request` with the plan's resolution, steps,
guidance and recorded parameters), inserts its job row idempotently
(:func:`registry.jobs.ensure_job`: the database's unique ``job_key`` makes two schedulers
racing insert it once) and hands the job to a dispatcher:

- :class:`RayJobs` (``--ray-address http://head:8265``): submits ``invardiff-registry
  recalibrate --job KEY --ray-address auto`` to the cluster's job server under the submission
  id ``invardiff-<job_key>-<attempts>``; the job server refuses a second submission of an id,
  so racing schedulers submit each job once, and a failed job (attempts + 1) is submitted again
  on a later run. A submission whose Ray job ended (or vanished) before its driver claimed the
  job is reconciled first (:meth:`RayJobs.reconcile`): the job fails with the reason and is
  submitted again under its next id;
- :class:`InProcess` (no address, ``auto``, ``ray://``): runs the jobs one after the other
  with the fleet's driver (:func:`workers.driver.submit`), whose lease lets one driver compute.

A setup due only because of age, an operator's mark or a revoked plan would give the very
request (and job key) that already succeeded; its request's ``refresh`` field (the plan's
sha256 and last calibration time) makes it a new job, computed afresh: a new version (its
calibration record names the new job), where the old job would answer with the revoked plan.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import select

from registry import jobs
from registry.errors import NotFound, RegistryError, Unreachable
from registry.models import CalibrationJob
from registry.staleness import DuePlan, Policy, find_due
from registry.stamps import utcnow

from .request import CalibrationRequest, build_request, library_versions

REFRESH_ONLY = {"too_old", "marked", "revoked"}
SUBMISSION_PREFIX = "invardiff-"
PROGRAM = "invardiff-registry"


def current_policy(max_age_days: float | None) -> Policy:
    """The policy for this host: its calibrator and library versions, and the maximum age."""
    age = None if max_age_days is None else timedelta(days=max_age_days)
    return Policy(versions=library_versions(), max_age=age)


def recalibration_request(registry, due: DuePlan, versions: dict[str, str]) -> CalibrationRequest:
    """The request that recalibrates ``due`` (see the module docstring)."""
    plan = due.plan
    model = registry.model(plan.model.name)
    if plan.job_request:
        request = CalibrationRequest.from_json(
            {
                **plan.job_request,
                "model": model.name,
                "source": model.source,
                "revision": model.revision,
                "versions": dict(versions),
            }
        )
    else:
        recorded = plan.calibration
        ours = "calibrator_version" in recorded
        params = _overrides(recorded.get("params") or {})
        request = build_request(
            model,
            plan.target.resolution,
            steps=plan.target.steps,
            guidance=plan.target.guidance,
            params=params if ours else None,
            trajectories=int(recorded.get("trajectories") or 8) if ours else 8,
        )
        request = replace(request, versions=dict(versions))
    if set(due.reasons) <= REFRESH_ONLY:
        request = replace(request, refresh=f"{plan.sha256}@{plan.calibrated_at.isoformat()}")
    return request


def _overrides(params: dict[str, Any]) -> dict[str, Any]:
    """A plan's recorded calibration parameters as ``CalibrationParams.resolve`` overrides."""
    flat = {k: v for k, v in params.items() if k not in ("arch", "q")}
    return {**flat, **{f"q_{kind}": q for kind, q in (params.get("q") or {}).items()}}


class Dispatcher(Protocol):
    def dispatch(self, registry, job: jobs.JobInfo) -> dict[str, Any]: ...

    def preview(self, registry, job: jobs.JobInfo) -> dict[str, Any]: ...


def submission_id(job: jobs.JobInfo) -> str:
    """The Ray job submission id of a job's next attempt."""
    return f"{SUBMISSION_PREFIX}{job.job_key}-{job.attempts}"


def job_entrypoint(
    job_key: str,
    workers: int | None = None,
    promote: str | None = None,
    gate: dict[str, float | None] | None = None,
) -> str:
    """What a submitted Ray job runs on the cluster's head (``gate``: ``min_psnr``,
    ``min_speedup``, passed on as ``--min-psnr`` / ``--min-speedup``)."""
    options = (f" --workers {int(workers)}" if workers else "") + (
        f" --promote {shlex.quote(promote)}" if promote else ""
    )
    for name, value in (gate or {}).items():
        if value is not None:
            options += f" --{name.replace('_', '-')} {float(value)!r}"
    return f"{PROGRAM} recalibrate --job {job_key} --ray-address auto{options} --json"


class RayJobs:
    """Submit to a Ray cluster's job server (its dashboard address, ``http://head:8265``)."""

    def __init__(
        self,
        address: str,
        workers: int | None = None,
        promote: str | None = None,
        gate: dict[str, float | None] | None = None,
    ) -> None:
        from ray.job_submission import JobSubmissionClient

        try:
            self.client = JobSubmissionClient(address)
        except Exception as exc:  # noqa: BLE001 - connection, auth, version: all mean unusable
            raise Unreachable(
                f"cannot reach the Ray job server at {address}: {_line(exc)}"
            ) from None
        self.address, self.workers, self.promote = address, workers, promote
        self.gate = gate or {}

    def dispatch(self, registry, job: jobs.JobInfo) -> dict[str, Any]:
        """Submit the job's next attempt, after reconciling its last submission (see
        :meth:`reconcile`): one that failed or vanished before its job started makes the
        job ``failed`` with the reason, and is submitted again as the next attempt."""
        state, reason = self.reconcile(registry, job)
        if state == ALIVE:
            return {"action": "already_submitted", "submission_id": submission_id(job)}
        if state == SUBMIT:
            return self._submit(registry, job)
        failed = submission_failed(registry, job, reason)
        if failed is None:  # another scheduler reconciled it first: its submission stands
            return {"action": "already_submitted", "submission_id": submission_id(job)}
        outcome = self._submit(registry, failed)
        return {**outcome, "action": "resubmitted", "error": reason,
                "failed_submission": submission_id(job)}  # fmt: skip

    def preview(self, registry, job: jobs.JobInfo) -> dict[str, Any]:
        """What :meth:`dispatch` would do, writing nothing (``--dry-run``)."""
        state, reason = self.reconcile(registry, job)
        if state == ALIVE:
            return {"action": "already_submitted", "submission_id": submission_id(job)}
        if state == SUBMIT:
            return {"action": "would_submit"}
        return {"action": "would_resubmit", "error": reason,
                "failed_submission": submission_id(job)}  # fmt: skip

    def reconcile(self, registry, job: jobs.JobInfo) -> tuple[str, str | None]:
        """The state of the job's current submission id on the job server.

        :data:`ALIVE` (pending or running there), :data:`SUBMIT` (never submitted), or
        :data:`FAILED_SUBMISSION` with its reason: it ended (failed, stopped, or exited) without
        its driver claiming the job (claiming moves the attempts, hence the id), or the row
        records it as submitted and the job server does not know it (a head that lost its
        jobs).
        """
        sid = submission_id(job)
        try:
            info = self.client.get_job_info(sid)
        except RuntimeError as exc:
            if "404" not in str(exc) and "does not exist" not in str(exc):
                raise Unreachable(
                    f"asking {self.address} about {sid} failed: {_line(exc)}"
                ) from None
            if recorded_submission(registry, job.job_key) != sid:
                return SUBMIT, None
            return FAILED_SUBMISSION, f"Ray job {sid} vanished from the job server {self.address}"
        except Exception as exc:  # noqa: BLE001 - connection, auth: the server is unusable
            raise Unreachable(f"asking {self.address} about {sid} failed: {_line(exc)}") from None
        status = str(getattr(info.status, "value", info.status))
        if status in ("PENDING", "RUNNING"):
            return ALIVE, None
        message = _line(RuntimeError(info.message or ""))[:500]
        return FAILED_SUBMISSION, f"Ray job {sid} ended {status} before its job started: {message}"

    def _submit(self, registry, job: jobs.JobInfo) -> dict[str, Any]:
        sid = submission_id(job)
        try:
            self.client.submit_job(
                entrypoint=job_entrypoint(job.job_key, self.workers, self.promote, self.gate),
                submission_id=sid,
                metadata={"invardiff_job_key": job.job_key, "model": job.model},
            )
        except RuntimeError as exc:
            if "already exists" not in str(exc):
                raise Unreachable(
                    f"submitting {sid} to {self.address} failed: {_line(exc)}"
                ) from None
            return {"action": "already_submitted", "submission_id": sid}
        record_submission(registry, job.job_key, sid, self.address)
        return {"action": "submitted", "submission_id": sid}


ALIVE, SUBMIT, FAILED_SUBMISSION = "alive", "submit", "failed_submission"


def _job_row(session, job_key: str) -> CalibrationJob:
    return session.scalar(
        select(CalibrationJob).where(CalibrationJob.job_key == job_key).with_for_update()
    )


def record_submission(registry, job_key: str, sid: str, address: str) -> None:
    """Write the Ray submission id of the job's next attempt into its row's lineage."""
    with registry.session() as session:
        row = _job_row(session, job_key)
        submitted = {"id": sid, "address": address, "at": utcnow().isoformat()}
        row.lineage = {**(row.lineage or {}), "submission": submitted}


def recorded_submission(registry, job_key: str) -> str | None:
    """The Ray submission id last recorded for the job (None: never submitted to a server)."""
    with registry.session() as session:
        lineage = session.scalar(
            select(CalibrationJob.lineage).where(CalibrationJob.job_key == job_key)
        )
    return ((lineage or {}).get("submission") or {}).get("id")


def submission_failed(registry, job: jobs.JobInfo, reason: str) -> jobs.JobInfo | None:
    """Mark ``job`` failed with ``reason``: its submission ended before its driver claimed it.

    Its attempts go up, so that its next submission has a new id. None when the row moved
    since ``job`` was read (a driver claimed it, or another scheduler reconciled it).
    """
    with registry.session() as session:
        row = _job_row(session, job.job_key)
        if row is None or row.attempts != job.attempts or row.status != job.status:
            return None
        row.status = "failed"
        row.attempts += 1
        row.error = reason[:2000]
        row.finished_at = utcnow()
        row.lease_holder = row.lease_expires_at = None
        session.flush()
        return jobs.job_info(row)


@dataclass
class InProcess:
    """Run each job here with the fleet's driver (a local Ray, or ``auto`` / ``ray://``)."""

    ray_address: str | None = None
    workers: int | None = None
    promote: str | None = None
    progress: Any = None
    gate: dict[str, float | None] | None = None  # min_psnr, min_speedup

    def preview(self, registry, job: jobs.JobInfo) -> dict[str, Any]:
        """What :meth:`dispatch` would do: run the job here."""
        return {"action": "would_submit"}

    def dispatch(self, registry, job: jobs.JobInfo) -> dict[str, Any]:
        from .driver import RunOptions, submit
        from .errors import JobBusy

        options = RunOptions(
            workers=self.workers,
            ray_address=self.ray_address,
            wait=False,
            promote=self.promote,
            progress=self.progress,
            **(self.gate or {}),
        )
        try:
            result = submit(registry, CalibrationRequest.from_json(job.request), options)
        except JobBusy:
            return {"action": "running_elsewhere"}
        except Unreachable:
            raise  # no cluster: every job would fail alike; rows stay pending for the next run
        except RegistryError as exc:  # this job failed (its row says so); go on with the next
            return {"action": "failed", "error": str(exc), "exit_code": exc.exit_code}
        return {
            "action": "calibrated" if result.gate.get("passed", True) else "gate_failed",
            "version": result.version,
            "sha256": result.sha256,
            "created": result.created,
            "plan_status": result.plan_status,
            "gate": result.gate,
            "promoted": result.promoted,
        }


def dispatcher_for(
    address: str | None,
    workers: int | None = None,
    promote: str | None = None,
    progress=None,
    gate: dict[str, float | None] | None = None,
) -> Dispatcher:
    """:class:`RayJobs` for an ``http(s)://`` address, else :class:`InProcess`."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        return RayJobs(address, workers, promote, gate)
    return InProcess(address, workers, promote, progress, gate)


def recalibrate_due(
    registry,
    policy: Policy,
    dispatcher: Dispatcher | None,
    say=lambda message: None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Find due setups and submit their jobs.

    ``dry_run`` writes nothing and reports what ``dispatcher`` would do (its ``preview``: a
    Ray job server is asked about the jobs' submissions); ``dispatcher`` None is a dry run
    that asks no one.
    """
    dry_run = dry_run or dispatcher is None
    with registry.session() as session:
        due = find_due(session, policy)
    entries = []
    for item in due:
        entry = item.to_json()
        try:
            request = recalibration_request(registry, item, policy.versions)
        except RegistryError as exc:
            entries.append({**entry, "action": "error", "error": str(exc)})
            say(f"{item.plan.model.name} {entry['resolution']}: cannot build its request: {exc}")
            continue
        entry["job_key"] = request.job_key
        if dry_run:
            entries.append({**entry, **_dry_run(registry, request.job_key, dispatcher)})
            continue
        job, inserted = jobs.ensure_job(registry, request.job_key, request.model, request.to_json())
        outcome = _dispatch(registry, dispatcher, job)
        entries.append({**entry, "inserted": inserted, **outcome})
        say(
            f"{item.plan.model.name} {entry['resolution']} ({', '.join(entry['reasons'])}): "
            f"job {request.job_key[:12]} {outcome['action']}"
        )
    return {
        "dry_run": dry_run,
        "due": entries,
        "submitted": sum(
            e["action"] in ("submitted", "resubmitted", "calibrated", "gate_failed")
            for e in entries
        ),
    }


def _dispatch(
    registry, dispatcher: Dispatcher, job: jobs.JobInfo, dry_run: bool = False
) -> dict[str, Any]:
    """Hand over a pending or failed job, or one whose driver died; report the others."""
    if job.status == jobs.SUCCEEDED:
        return {"action": "succeeded", "version": (job.result or {}).get("version")}
    if job.status == "running" and not _expired(job):
        return {"action": "running", "lease_holder": job.lease_holder}
    return dispatcher.preview(registry, job) if dry_run else dispatcher.dispatch(registry, job)


def _expired(job: jobs.JobInfo) -> bool:
    expires = job.lease_expires_at
    return expires is None or datetime.fromisoformat(expires) <= utcnow()


def _dry_run(registry, job_key: str, dispatcher: Dispatcher | None) -> dict[str, Any]:
    """What a real run would do with the job, without writing anything."""
    try:
        job = jobs.get_job(registry, job_key)
    except NotFound:
        return {"action": "would_submit"}
    return _dispatch(registry, dispatcher or InProcess(), job, dry_run=True)


def run_job(registry, job_ref: str, dispatcher: InProcess) -> dict[str, Any]:
    """Run one stored job (what a submitted Ray job executes): its request, on this cluster."""
    job = jobs.get_job(registry, job_ref)
    return {"job_key": job.job_key, "model": job.model, **_dispatch(registry, dispatcher, job)}


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
