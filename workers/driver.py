"""The calibration driver: one request -> one durable job -> one published, validated plan.

``submit(registry, request, options)`` is the fleet's API (the ``calibrate`` command and the
scheduler call it):

1. A job that already succeeded is answered from its row (``created: false``), no Ray.
2. Ray is started (or reached); then the job row is claimed (:func:`registry.jobs.claim`).
   A job running under another driver's live lease is waited on (or, without ``wait``,
   reported as busy); an expired lease is taken over.
3. Phase 1 shards missing from the store are computed by the actors (one trajectory each,
   written once under ``jobs/<job_key>/phase-1/<index>``); the merged statistics give the
   provisional flags, broadcast for phase 2, likewise.
4. One worker builds the plan from the stored shards in index order (a budget request:
   the driver runs the budget search, its held-out measurements fanned out over the workers,
   one plan per task), then validates it on held-out seeds; the quality gate (``--min-psnr``,
   ``--min-speedup``) decides how the plan is published: ``ready``, or ``failed_gate``
   (recorded with its metrics, never served, never promoted); the job row records the result.

A later run of a request that already succeeded re-judges the stored metrics: a gate with
thresholds that passes puts a ``failed_gate`` plan into service (``Registry.admit``); a gate
never withdraws a plan. A request whose plan was revoked is not answered with it:
:class:`PlanRevoked` (exit 3); its target is due for ``recalibrate --due``.
"""

from __future__ import annotations

import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from registry import jobs
from registry.errors import Conflict, InvalidInput, NotFound, RegistryError
from registry.matching import FAILED_GATE, READY, REVOKED, TargetKey

from .errors import JobBusy, JobFailed
from .interrupts import check_signals, restore_signals, trap_signals
from .options import check_options
from .pipelines import check_checkpoint
from .request import CalibrationRequest, shard_prefix
from .shards import DamagedShard
from .shards import check as check_shard

WAIT_POLL_S = 1.0


class PlanRevoked(NotFound):
    """The plan this request produces was revoked: not a result (exit 3, like any unservable plan)."""


@dataclass
class RunOptions:
    """How to run a request (none of this changes the result's bytes)."""

    workers: int | None = None  # default: as many as the cluster holds (workers.pool.plan_workers)
    ray_address: str | None = None  # default: RAY_ADDRESS, else a local Ray for this call
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # default: INVARDIFF_WORKER_GPUS, else 1 if GPUs exist
    lease_seconds: float = jobs.DEFAULT_LEASE_SECONDS
    wait: bool = True  # wait on a job another driver is running
    min_psnr: float | None = None
    min_speedup: float | None = None
    promote: str | None = None
    report: Path | None = None
    shuffle: int | None = None  # dispatch shards in a random order seeded by this (tests)
    on_shard: Callable[[int, dict[str, Any]], None] | None = None  # (phase, shard result)
    progress: Callable[[str], None] | None = None


@dataclass
class JobResult:
    """What a submission produced; ``to_json`` is the command's JSON contract."""

    job_key: str
    status: str
    created: bool
    model: str
    version: int | None
    sha256: str | None
    target: dict[str, Any] | None
    metrics: dict[str, Any]
    gate: dict[str, Any]
    promoted: str | None
    plan_status: str = READY  # ready, failed_gate (never served) or revoked
    phases: dict[str, Any] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    worker_restarts: int = 0
    workers_lost: list[dict[str, Any]] = field(default_factory=list)
    worker_plan: dict[str, Any] | None = None
    report: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["workers_used"] = len(self.workers)
        return data


def quality_gate(
    metrics: dict[str, Any], min_psnr: float | None, min_speedup: float | None
) -> dict[str, Any]:
    """Whether measured metrics meet the thresholds.

    ``psnr_db`` None means identical outputs (infinite PSNR); a plan without validation
    metrics fails any threshold.
    """
    reasons = []
    if (min_psnr is not None or min_speedup is not None) and "measured_speedup" not in metrics:
        reasons.append("the plan has no validation metrics (it was calibrated with --validate 0)")
    psnr, speedup = metrics.get("psnr_db"), metrics.get("measured_speedup")
    if min_psnr is not None and psnr is not None and psnr < min_psnr:
        reasons.append(f"PSNR {psnr} dB < {min_psnr} dB")
    if min_speedup is not None and speedup is not None and speedup < min_speedup:
        reasons.append(f"measured speed-up {speedup}x < {min_speedup}x")
    return {
        "passed": not reasons,
        "min_psnr": min_psnr,
        "min_speedup": min_speedup,
        "reasons": reasons,
    }


def submit(registry, request: CalibrationRequest, options: RunOptions | None = None) -> JobResult:
    """Run ``request`` as a durable, idempotent job (see the module docstring).

    Raises :class:`~workers.errors.JobFailed` (exit 9), :class:`~workers.errors.JobBusy`
    (exit 10), ``Unreachable`` (exit 5) for a Ray cluster that cannot be reached; the quality
    gate is reported in ``result.gate`` (the CLI turns a failed gate into exit 8).
    """
    from .pool import ray_session

    options = options or RunOptions()
    check_options(options)
    if (
        options.min_psnr is not None or options.min_speedup is not None
    ) and not request.validation.get("calls"):
        raise InvalidInput("--min-psnr/--min-speedup need validation samples (--validate N > 0)")
    done = _succeeded(registry, request.job_key)
    if done is not None:
        return _finish_existing(registry, done, options)
    check_checkpoint(request.source, request.revision)  # loadable, before any worker starts
    previous = trap_signals()
    try:
        with ray_session(options.ray_address) as local:
            trap_signals()  # again: starting Ray installs its own (aborting) SIGTERM handler
            check_signals()
            return _Run(registry, request, options, local).execute()
    finally:
        restore_signals(previous)


def _succeeded(registry, job_key: str) -> jobs.JobInfo | None:
    try:
        job = jobs.get_job(registry, job_key)
    except NotFound:
        return None
    return job if job.status == jobs.SUCCEEDED else None


def _finish_existing(registry, job: jobs.JobInfo, options: RunOptions) -> JobResult:
    """The result of a job that already succeeded: gate and promotion on its stored metrics."""
    result = _result_from_job(job, created=False)
    _apply_gate_and_promotion(registry, result, options)
    if options.report is not None:
        result.report = _copy_report(registry, job.job_key, result, options.report)
    return result


def _result_from_job(job: jobs.JobInfo, created: bool) -> JobResult:
    stored = job.result or {}
    return JobResult(
        job_key=job.job_key,
        status=job.status,
        created=created,
        model=job.model,
        version=stored.get("version"),
        sha256=stored.get("sha256"),
        target=stored.get("target"),
        metrics=stored.get("metrics", {}),
        gate={},
        promoted=None,
        phases=job.timings or {},
        workers=stored.get("workers", []),
        attempts=job.attempts,
    )


def _apply_gate_and_promotion(registry, result: JobResult, options: RunOptions) -> None:
    """Judge the plan by this run's gate; admit a ``failed_gate`` plan it passes; promote."""
    if result.sha256 is None:
        return
    gate = quality_gate(result.metrics, options.min_psnr, options.min_speedup)
    status = (
        registry.version_status(result.sha256, TargetKey.from_json(result.target))
        if result.target
        else registry.show(result.sha256, result.model)["status"]
    )
    if status == REVOKED:
        raise PlanRevoked(
            f"the plan of job {result.job_key[:12]} ({result.model} v{result.version}, "
            f"{result.sha256[:12]}) was revoked: the same request gives the same plan, so it is "
            "not computed again; change the request, or run `invardiff-registry recalibrate "
            "--due`, which recalibrates its target as a new job"
        )
    thresholds = options.min_psnr is not None or options.min_speedup is not None
    if status == FAILED_GATE and gate["passed"] and thresholds:
        status = registry.admit(result.sha256, gate, result.model).status
    elif status == FAILED_GATE and gate["passed"]:
        again = (
            "the plan failed its quality gate when it was published (FAILED-GATE, never served): "
            "give --min-psnr/--min-speedup to judge it again"
        )
        gate = {**gate, "passed": False, "reasons": [again]}
    result.gate, result.plan_status = gate, status
    if options.promote and gate["passed"]:
        registry.promote(result.sha256, options.promote, model_name=result.model)
        result.promoted = options.promote


class _Heartbeat:
    """Renews the job's lease in the background; :meth:`check` raises once it was lost."""

    def __init__(self, registry, job_key: str, holder: str, lease_seconds: float) -> None:
        self.registry, self.job_key, self.holder = registry, job_key, holder
        self.lease_seconds = lease_seconds
        self.progress: dict[str, Any] = {}
        self.lost: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _Heartbeat:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                jobs.heartbeat(
                    self.registry,
                    self.job_key,
                    self.holder,
                    dict(self.progress),
                    self.lease_seconds,
                )
            except Conflict as exc:
                self.lost = exc
                return
            except RegistryError:
                continue  # a database hiccup: try again before the lease runs out

    def check(self) -> None:
        """Raise a lost lease (:class:`Conflict`) or a received signal (:class:`Interrupted`)."""
        check_signals()
        if self.lost is not None:
            raise self.lost


class _Run:
    """One driver's attempt at one job."""

    def __init__(
        self, registry, request: CalibrationRequest, options: RunOptions, local: bool = False
    ) -> None:
        self.registry, self.request, self.options, self.local = registry, request, options, local
        self.key = request.job_key
        progress = options.progress or (lambda message: None)
        self.say = lambda message: progress(f"{_now()} {message}")
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.phases: dict[str, Any] = {}

    def execute(self) -> JobResult:
        claim = self._claim()
        if claim.state == jobs.SUCCEEDED:
            return _finish_existing(self.registry, claim.job, self.options)
        request = self.request
        self.say(
            f"job {self.key[:12]}: {request.model} {request.resolution}, {request.steps} steps, "
            f"{len(request.calls)} trajectories; attempt {claim.job.attempts} by {self.holder}"
        )
        jobs.record(self.registry, self.key, "attempt", f"by {self.holder}")
        started = time.perf_counter()
        try:
            with _Heartbeat(
                self.registry, self.key, self.holder, self.options.lease_seconds
            ) as beat:
                self.beat = beat
                result = self._compute(claim.job.attempts)
        except Conflict:
            raise  # the lease was taken over: the other driver's outcome stands
        except BaseException as exc:
            self.phases["total_s"] = round(time.perf_counter() - started, 3)
            error = f"{type(exc).__name__}: {exc}"
            jobs.fail(self.registry, self.key, self.holder, error, self.phases)
            jobs.record(self.registry, self.key, "error", error)
            if isinstance(exc, RegistryError):
                raise
            if isinstance(exc, Exception):
                raise JobFailed(f"job {self.key[:12]} failed: {type(exc).__name__}: {exc}") from exc
            raise
        return result

    def _claim(self) -> jobs.Claim:
        announced = False
        while True:
            claim = jobs.claim(self.registry, self.key, self.request.model, self.request.to_json(),
                               self.holder, self.options.lease_seconds)  # fmt: skip
            if claim.state != jobs.BUSY:
                return claim
            if not self.options.wait:
                raise JobBusy(f"job {self.key[:12]} is running under {claim.job.lease_holder}")
            if not announced:
                self.say(f"job {self.key[:12]} is running under {claim.job.lease_holder}: waiting")
                announced = True
            time.sleep(WAIT_POLL_S)
            check_signals()  # Ctrl-C while waiting on another driver: nothing of ours to fail

    def _compute(self, attempts: int) -> JobResult:
        from .pool import WorkerPool, plan_workers

        registry, request, options = self.registry, self.request, self.options
        config_store = registry.store.url
        plan = plan_workers(options.workers, len(request.calls), options.cpus_per_worker,
                            options.gpus_per_worker, self.local)  # fmt: skip
        self.worker_plan = plan.to_json()
        each = f"{plan.gpus:g} GPU" if plan.gpus > 0 else f"{plan.cpus:g} CPU"
        self.say(f"workers: {plan.count}, {each} each ({plan.reason})")
        started = time.perf_counter()
        pool = WorkerPool(
            request.to_json(), self.key, config_store, _s3_endpoint(registry), plan, self.say,
            on_event=lambda event, detail: jobs.record(registry, self.key, event, detail),
        )  # fmt: skip
        try:
            self.pool = pool
            phase1 = self._phase(1, None)
            if request.budget:  # budget-targeted: phase 1 statistics, then a measured search
                from invardiff.budget import describe_targets

                self.say(f"searching the plan for {describe_targets(**request.budget)}")
                plan_bytes = self._timed("build_s", self._budget, phase1)
            else:
                provisional = self._timed("barrier_s", self._provisional, phase1)
                phase2 = self._phase(2, provisional)
                self.say("building the plan")
                plan_bytes = self._timed(
                    "build_s", pool.call_one, "build", phase1, phase2, tick=self.beat.check
                )
            validation = self._validate(plan_bytes)
            workers = pool.workers()
            self.restarts, self.lost = pool.restarts, pool.settle_lost()
        finally:
            pool.shutdown()
        self.phases["compute_s"] = round(time.perf_counter() - started, 3)
        return self._publish(plan_bytes, validation, workers, attempts)

    def _budget(self, phase1: list[bytes]) -> bytes:
        """The budget search (``invardiff.budget.budget_plan``) here, its held-out
        measurements (selection and certification) fanned out over the workers, one plan per task."""
        from invardiff.budget import budget_plan
        from invardiff.calibration import TrajectoryStats, merge_scores
        from invardiff.plan import CachePlan

        from .actors import finish_plan

        start = self.pool.call_one("budget_start", phase1, tick=self.beat.check)
        stats = [TrajectoryStats.from_bytes(b) for b in phase1]
        plan = budget_plan(CachePlan.from_bytes(start["template"]), merge_scores(stats),
                           **self.request.budget, measure=self._measurer("selection"),
                           certify=self._measurer("certification"), flag_index=start["flag_index"],
                           provenance=start["record"], say=self.say)  # fmt: skip
        return finish_plan(plan, self.request)

    def _measurer(self, stage: str):
        """The budget search's ``measure(plans, done)`` on ``stage``'s held-out calls, over the
        pool (see ``CalibrationWorker.measure``)."""

        def measure(plans: list, done) -> list[list[float]]:
            blobs = [plan.to_bytes() for plan in plans]
            values: list[list[float] | None] = [None] * len(blobs)
            started, pids = time.perf_counter(), []

            def record(result: dict[str, Any]) -> None:
                values[result["index"]] = result["psnr"]
                pids.append(result["pid"])
                self.beat.progress["measure"] = {"stage": stage, "done": len(pids), "total": len(blobs)}
                done()

            self.pool.map(range(len(blobs)), lambda actor, i: actor.measure.remote(i, blobs[i], stage),
                          record, tick=self.beat.check)  # fmt: skip
            totals = self.phases.setdefault("measure", {"plans": 0, "seconds": 0.0, "workers": 0})
            totals["plans"] += len(blobs)
            totals["seconds"] = round(totals["seconds"] + time.perf_counter() - started, 3)
            totals["workers"] = max(totals["workers"], len(set(pids)))
            return [[float(v) for v in samples] for samples in values]

        return measure

    def _timed(self, name: str, function, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        value = function(*args, **kwargs)
        self.phases[name] = round(time.perf_counter() - started, 3)
        return value

    def _phase(self, phase: int, provisional) -> list[bytes]:
        """Compute the missing shards of ``phase``; return every shard's bytes in index order."""
        request, store = self.request, self.registry.store
        total = len(request.calls)
        prefix = shard_prefix(self.key, phase)
        listed = {int(o.key.rsplit("/", 1)[1]) for o in store.list(prefix)}
        stored = {i for i in listed if i < total and self._intact(phase, i)}
        missing = [i for i in range(total) if i not in stored]
        if self.options.shuffle is not None:
            random.Random(self.options.shuffle + phase).shuffle(missing)
        counts = {"total": total, "computed": 0, "reused": total - len(missing)}
        self.say(f"phase {phase}: {counts['reused']}/{total} trajectories already stored")
        started = time.perf_counter()

        times: list[float] = []  # seconds of each shard computed in this phase

        def done(result: dict[str, Any]) -> None:
            counts["computed" if result["computed"] else "reused"] += 1
            finished = counts["computed"] + counts["reused"]
            if result["computed"]:
                times.append(result["seconds"])
            eta = _eta(times, total - finished, len(self.pool.info))
            self.beat.progress[f"phase-{phase}"] = {
                **counts, "done": finished, "eta_s": eta, "updated_at": _now(),
            }  # fmt: skip
            self.say(f"phase {phase}: {finished}/{total} trajectories" + _eta_text(eta))
            if self.options.on_shard is not None:
                self.options.on_shard(phase, result)

        def run(actor, index):
            return actor.run_shard.remote(phase, index, provisional)

        self.beat.progress[f"phase-{phase}"] = {**counts, "done": counts["reused"]}
        self.pool.map(missing, run, done, self.beat.check)
        self.phases[f"phase-{phase}"] = {
            **counts,
            "seconds": round(time.perf_counter() - started, 3),
        }
        shards = [store.get(request.shard_key(phase, i)) for i in range(total)]
        for index, data in enumerate(shards):
            try:
                check_shard(data, self.key, phase, index)
            except DamagedShard as exc:
                raise JobFailed(
                    f"shard {request.shard_key(phase, index)} is damaged after computing it: {exc}"
                ) from None
        return shards

    def _intact(self, phase: int, index: int) -> bool:
        """Whether stored shard ``index`` is intact; a damaged one is named, deleted (so that
        it is computed again) and recorded in the job's history."""
        key = self.request.shard_key(phase, index)
        try:
            check_shard(self.registry.store.get(key), self.key, phase, index)
            return True
        except NotFound:
            return False
        except DamagedShard as exc:
            self.say(f"shard {key} is damaged ({exc}): computing it again")
            jobs.record(self.registry, self.key, "damaged_shard", f"{key}: {exc}")
            self.registry.store.delete(key)
            return False

    def _provisional(self, phase1: list[bytes]):
        import ray

        from invardiff.calibration import (
            CalibrationParams,
            TrajectoryStats,
            merge_scores,
            provisional_flags,
        )

        from .actors import encode_flags

        params = CalibrationParams(**self.request.params)
        flags = provisional_flags(
            merge_scores([TrajectoryStats.from_bytes(b) for b in phase1]), params
        )
        return ray.put(encode_flags(flags))

    def _validate(self, plan_bytes: bytes) -> dict[str, Any] | None:
        calls = self.request.validation.get("calls") or []
        if not calls:
            return None
        self.say(f"validation: {len(calls)} held-out samples, full vs cached, interleaved")
        started = time.perf_counter()
        repeats = int(self.request.validation.get("repeats", 3))
        validation = self.pool.call_one(
            "validate", plan_bytes, calls, repeats, tick=self.beat.check
        )
        self.phases["validation"] = {"seconds": round(time.perf_counter() - started, 3)}
        metrics = validation["metrics"]
        self.say(f"validation: {metrics['measured_speedup']}x measured ({metrics['ideal_speedup']}x ideal), "
                 f"PSNR {metrics['psnr_db']} dB, SSIM {metrics.get('ssim')}")  # fmt: skip
        return validation

    def _publish(self, plan_bytes: bytes, validation, workers, attempts: int) -> JobResult:
        from .report import store_report

        registry, request = self.registry, self.request
        published, target_id, metrics = publish_under_gate(
            registry, request, plan_bytes, validation, self.options
        )
        sha256 = published.version.sha256
        self.say(f"published {request.model} v{published.version.version} {sha256[:12]}"
                 f" ({'new' if published.created else 'same bytes as before'})")  # fmt: skip
        result = JobResult(
            job_key=self.key,
            status=jobs.SUCCEEDED,
            created=True,
            model=request.model,
            version=published.version.version,
            sha256=sha256,
            target=published.target.to_json(),
            metrics=metrics,
            gate={},
            promoted=None,
            phases=self.phases,
            workers=workers,
            attempts=attempts,
            worker_restarts=self.restarts,
            workers_lost=self.lost,
            worker_plan=self.worker_plan,
        )
        store_report(registry.store, self.key, plan_bytes, validation, result.to_json())
        stored = {
            k: getattr(result, k) for k in ("version", "sha256", "target", "metrics", "workers")
        }
        jobs.finish(
            registry,
            self.key,
            self.holder,
            stored,
            self.phases,
            dict(self.beat.progress),
            target_id,
        )
        jobs.record(registry, self.key, "succeeded", f"v{result.version} {sha256[:12]}")
        _apply_gate_and_promotion(registry, result, self.options)
        if self.options.report is not None:
            result.report = _copy_report(registry, self.key, result, self.options.report)
        return result


def publish_under_gate(
    registry,
    request: CalibrationRequest,
    plan_bytes: bytes,
    validation: dict[str, Any] | None,
    options: RunOptions,
):
    """Publish a computed plan with its validation metrics, as ``failed_gate`` when they are
    below ``options``' gate; return the publish result, the target's id and the metrics."""
    measured = {"validation": validation["metrics"]} if validation else {}
    measured.update(_flat(validation["metrics"]) if validation else {})
    measured.update(_certified(plan_bytes))
    gate = quality_gate(measured, options.min_psnr, options.min_speedup)
    if options.min_psnr is not None or options.min_speedup is not None:
        measured["gate"] = gate  # the gate it was published under (``show``)
    published = registry.publish_bytes(
        plan_bytes,
        f"{request.job_key[:16]}.plan.json",
        request.model,
        request.resolution,
        request.steps,
        status=READY if gate["passed"] else FAILED_GATE,
    )
    target_id, metrics = jobs.add_version_metrics(
        registry, published.version.sha256, published.target.key_hash, measured
    )
    return published, target_id, metrics


def _now() -> str:
    """The UTC time of a progress line (seconds)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _eta(times: list[float], remaining: int, workers: int) -> float | None:
    """Seconds left in a phase: the remaining shards at the mean shard time so far, spread
    over the ready workers (None before a first shard was computed)."""
    if remaining <= 0:
        return 0.0
    if not times:
        return None
    return round(sum(times) / len(times) * math.ceil(remaining / max(1, workers)), 1)


def _eta_text(eta: float | None) -> str:
    return "" if eta is None else f", ETA {eta:.0f} s"


def _flat(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline validation figures at the top level of a version's metrics (for ``list``)."""
    keys = ("measured_speedup", "psnr_db", "ssim")
    return {k: metrics[k] for k in keys if k in metrics}


def _certified(plan_bytes: bytes) -> dict[str, Any]:
    """A budget plan's certified figures (its provenance) as version metrics; {} for others."""
    from invardiff.plan import CachePlan

    figures = CachePlan.from_bytes(plan_bytes).calibration.get("certified")
    if not figures:
        return {}
    return {"certified_psnr_mean": figures["psnr_mean"], "certified_psnr_p5": figures["psnr_p5"],
            "certified_psnr_p5_bound": figures.get("psnr_p5_bound"),
            "certified_samples": figures["samples"]}  # fmt: skip


def _copy_report(registry, job_key: str, result: JobResult, folder: Path) -> dict[str, str]:
    from .report import copy_report

    return copy_report(registry.store, job_key, result.to_json(), folder)


def _s3_endpoint(registry) -> str | None:
    return (
        getattr(registry.store, "endpoint_url", None)
        or os.environ.get("INVARDIFF_S3_ENDPOINT_URL")
        or None
    )
