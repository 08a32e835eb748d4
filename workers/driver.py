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
   one plan per task), then validates it on held-out seeds; the plan is published with its metrics, the quality gate decides on
   promotion, and the job row records the result.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from registry import jobs
from registry.errors import Conflict, InvalidInput, NotFound, RegistryError

from .errors import JobBusy, JobFailed
from .request import CalibrationRequest, shard_prefix

WAIT_POLL_S = 1.0


@dataclass
class RunOptions:
    """How to run a request (none of this changes the result's bytes)."""

    workers: int | None = None  # default: one per GPU, else per cpus_per_worker CPUs
    ray_address: str | None = None  # default: RAY_ADDRESS, else a local Ray for this call
    cpus_per_worker: float = 1.0
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
    phases: dict[str, Any] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    worker_restarts: int = 0
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
    if (
        options.min_psnr is not None or options.min_speedup is not None
    ) and not request.validation.get("calls"):
        raise InvalidInput("--min-psnr/--min-speedup need validation samples (--validate N > 0)")
    if options.workers is not None and options.workers < 1:
        raise InvalidInput("--workers must be at least 1")
    done = _succeeded(registry, request.job_key)
    if done is not None:
        return _finish_existing(registry, done, options)
    with ray_session(options.ray_address, options.workers):
        return _Run(registry, request, options).execute()


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
    result.gate = quality_gate(result.metrics, options.min_psnr, options.min_speedup)
    if options.promote and result.gate["passed"] and result.sha256:
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
        if self.lost is not None:
            raise self.lost


class _Run:
    """One driver's attempt at one job."""

    def __init__(self, registry, request: CalibrationRequest, options: RunOptions) -> None:
        self.registry, self.request, self.options = registry, request, options
        self.key = request.job_key
        self.say = options.progress or (lambda message: None)
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
            jobs.fail(
                self.registry, self.key, self.holder, f"{type(exc).__name__}: {exc}", self.phases
            )
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

    def _compute(self, attempts: int) -> JobResult:
        from .pool import WorkerPool, default_worker_count

        registry, request, options = self.registry, self.request, self.options
        config_store = registry.store.url
        count = min(
            options.workers or default_worker_count(options.cpus_per_worker), len(request.calls)
        )
        started = time.perf_counter()
        pool = WorkerPool(
            request.to_json(), self.key, config_store, _s3_endpoint(registry), count,
            options.cpus_per_worker, self.say,
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
            self.restarts = pool.restarts
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
        stored = {int(o.key.rsplit("/", 1)[1]) for o in store.list(prefix)}
        missing = [i for i in range(total) if i not in stored]
        if self.options.shuffle is not None:
            random.Random(self.options.shuffle + phase).shuffle(missing)
        counts = {"total": total, "computed": 0, "reused": total - len(missing)}
        self.say(f"phase {phase}: {counts['reused']}/{total} trajectories already stored")
        started = time.perf_counter()

        def done(result: dict[str, Any]) -> None:
            counts["computed" if result["computed"] else "reused"] += 1
            finished = counts["computed"] + counts["reused"]
            self.beat.progress[f"phase-{phase}"] = {**counts, "done": finished}
            self.say(f"phase {phase}: {finished}/{total} trajectories")
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
        return [store.get(request.shard_key(phase, i)) for i in range(total)]

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
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{self.key[:16]}.plan.json"
            path.write_bytes(plan_bytes)
            published = registry.publish(path, request.model, request.resolution, request.steps)
        sha256 = published.version.sha256
        measured = {"validation": validation["metrics"]} if validation else {}
        measured.update(_flat(validation["metrics"]) if validation else {})
        measured.update(_certified(plan_bytes))
        target_id, metrics = jobs.add_version_metrics(
            registry, sha256, published.target.key_hash, measured
        )
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
        _apply_gate_and_promotion(registry, result, self.options)
        if self.options.report is not None:
            result.report = _copy_report(registry, self.key, result, self.options.report)
        return result


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
