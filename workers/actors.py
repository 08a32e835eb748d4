"""The calibration worker: one per accelerator, loads the pipeline once, computes shards.

:class:`CalibrationWorker` is a plain class (usable in-process by benchmarks); the driver
wraps it with ``ray.remote`` (:func:`remote_worker`). Every method is idempotent, so Ray's
at-least-once retries are harmless: a shard already in the store is not computed again, and
a duplicate write of the same key is refused by the store's write-once ``put_new``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from registry.checkpoints import checkpoint_id
from registry.errors import NotFound
from registry.store import open_store

from .pipelines import load_pipeline
from .request import CalibrationRequest, library_versions
from .shards import seal

# A restarted actor reloads the pipeline; the driver re-queues the shard it was running.
MAX_RESTARTS = 4


def encode_flags(flags: dict[str, Any]) -> bytes:
    """Provisional flags as safetensors bytes (what the driver broadcasts; no pickle)."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in flags.items()})


def decode_flags(data: bytes) -> dict[str, Any]:
    from safetensors.torch import load

    return load(data)


def held_out(request: CalibrationRequest) -> dict[str, list[dict[str, Any]]]:
    """The budget search's held-out calls by stage, ``"selection"`` and ``"certification"``:
    the calibration calls with fresh seeds each, the certification's repeated for a 5th-percentile
    floor (``invardiff.holdout.held_out_sets``)."""
    from invardiff.budget_calibration import certification_samples
    from invardiff.holdout import held_out_sets

    selection, certification = held_out_sets(request.calls, min_samples=certification_samples(request.budget or {}))
    return {"selection": selection, "certification": certification}


def finish_plan(plan, request: CalibrationRequest) -> bytes:
    """The request's resolution and identity recorded in the plan; its canonical bytes."""
    target = replace(plan.target, height=request.height, width=request.width)
    calibration = {
        **plan.calibration,
        "job_key": request.job_key,
        "prompts_sha256": request.prompts_sha256,
    }
    return replace(plan, target=target, calibration=calibration).to_bytes()


class CalibrationWorker:
    """Holds one pipeline; computes trajectory statistics, builds, measures and validates plans."""

    def __init__(
        self,
        request: dict[str, Any],
        job_key: str,
        store_url: str,
        s3_endpoint_url: str | None = None,
    ):
        import torch

        from invardiff.calibration import CalibrationParams, pipeline_runner

        started = time.perf_counter()
        self.request = CalibrationRequest.from_json(request)
        if self.request.job_key != job_key:  # driver and worker run different fleet code
            raise RuntimeError(
                f"this worker derives job key {self.request.job_key[:12]}, not {job_key[:12]}"
            )
        here = library_versions()
        if here != self.request.versions:
            raise RuntimeError(
                f"worker libraries {here} differ from the request's {self.request.versions}"
            )
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(
            self.request.source, self.request.revision, self.request.dtype, self.device
        )
        self.transformer = self.pipe.transformer
        self.runner = pipeline_runner(self.pipe)
        self.params = CalibrationParams(**self.request.params)
        self.store = open_store(store_url, s3_endpoint_url)
        self._measures: dict[str, Any] = {}  # the held-out measure per stage, made on first use
        self.load_seconds = time.perf_counter() - started

    def ready(self) -> dict[str, Any]:
        """Where this worker runs and how long loading took."""
        return {
            "node": _node_id(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": self.device,
            "load_s": round(self.load_seconds, 3),
        }

    def _stored(self, key: str) -> bool:
        try:
            self.store.get(key)
            return True
        except NotFound:
            return False

    def run_shard(self, phase: int, index: int, provisional: bytes | None = None) -> dict[str, Any]:
        """Compute trajectory ``index`` of ``phase`` into the store unless it is already there."""
        from invardiff.calibration import trajectory_stats

        key = self.request.shard_key(phase, index)
        if self._stored(key):
            _log(f"shard phase-{phase}/{index}: already stored, skipped")
            return {"index": index, "computed": False, "seconds": 0.0, "pid": os.getpid()}
        _log(f"shard phase-{phase}/{index}: start")
        started = time.perf_counter()
        flags = decode_flags(provisional) if provisional is not None else None
        call = self.request.calls[index]
        stats = trajectory_stats(
            self.transformer, self.runner, call, index, self.request.steps, self.params, flags
        )
        data = seal(stats.to_bytes(), self.request.job_key, phase, index)
        self.store.put_new(key, data, hashlib.sha256(data).hexdigest())
        seconds = time.perf_counter() - started
        _log(f"shard phase-{phase}/{index}: end, {seconds:.2f} s, {len(data)} bytes stored")
        return {"index": index, "computed": True, "seconds": seconds, "pid": os.getpid()}

    def build(self, phase1: list[bytes], phase2: list[bytes]) -> bytes:
        """The plan's canonical bytes from both phases' statistics (merged in index order)."""
        from invardiff.calibration import TrajectoryStats, build_plan

        first = [TrajectoryStats.from_bytes(b) for b in phase1]
        second = [TrajectoryStats.from_bytes(b) for b in phase2]
        request = self.request
        plan = build_plan(self.pipe, request.calls, self.params, first, second,
                          model_id=checkpoint_id(request.source), revision=request.revision)  # fmt: skip
        return finish_plan(plan, request)

    def budget_start(self, phase1: list[bytes]) -> dict[str, Any]:
        """What the driver's budget search starts from (``invardiff.budget.budget_plan``): the
        all-compute template plan (target, layer counts, geometry) and the provenance record
        (``invardiff.budget_calibration.budget_record``, as in-process)."""
        from invardiff.budget_calibration import budget_record, template_plan
        from invardiff.calibration import TrajectoryStats

        request, stats = self.request, [TrajectoryStats.from_bytes(b) for b in phase1]
        template = template_plan(self.pipe, request.calls, stats,
                                 model_id=checkpoint_id(request.source), revision=request.revision)  # fmt: skip
        sets = held_out(request)
        record = budget_record(request.calls, self.params, sets["selection"], sets["certification"])
        return {
            "template": template.to_bytes(),
            "record": record,
            "flag_index": self.params.flag_index,
        }

    def measure(self, index: int, plan_bytes: bytes, stage: str = "selection") -> dict[str, Any]:
        """Per-sample PSNR (dB) of one plan against full compute on the ``stage``'s held-out
        calls (``"selection"`` or ``"certification"``: the budget search's measures,
        ``invardiff.holdout.holdout_measure``; a stage's full-compute references are computed
        on this worker's first call for it)."""
        from invardiff.holdout import holdout_measure
        from invardiff.plan import CachePlan

        if stage not in self._measures:
            self._measures[stage] = holdout_measure(self.pipe, held_out(self.request)[stage])
        (psnr,) = self._measures[stage]([CachePlan.from_bytes(plan_bytes)], lambda: None)
        return {"index": index, "psnr": psnr, "pid": os.getpid()}

    def _sample(self, call: dict[str, Any], seeds: list[int]):
        import numpy as np
        import torch

        generators = [torch.Generator().manual_seed(s) for s in seeds]
        with torch.no_grad():
            images = self.pipe(**call, generator=generators, output_type="np").images
        if self.device == "cuda":
            torch.cuda.synchronize()
        return np.asarray(images, dtype=np.float32)

    def validate(
        self, plan_bytes: bytes, calls: list[dict[str, Any]], repeats: int
    ) -> dict[str, Any]:
        """Full compute vs the plan on held-out calls, timed interleaved on this worker.

        Returns the metrics and both image batches (``full``, ``cached``: (N, H, W, C) in [0, 1]).
        """
        import numpy as np

        from invardiff import metrics
        from invardiff.holdout import merge_calls
        from invardiff.plan import CachePlan
        from invardiff.timing import time_full_vs_cached

        plan = CachePlan.from_bytes(plan_bytes)
        call, seeds = merge_calls(calls)
        self._sample(call, seeds)  # warm-up, untimed
        timed = time_full_vs_cached(self.pipe, plan, lambda _: self._sample(call, seeds), repeats)
        full, fast = timed.full, timed.cached
        psnr = float(metrics.psnr(fast, full))
        result = {
            "samples": len(seeds),
            "seeds": seeds,
            "repeats": repeats,
            "device": self.device,
            "full_s": round(timed.full_s, 4),
            "cached_s": round(timed.cached_s, 4),
            "measured_speedup": round(timed.speedup, 3),
            "ideal_speedup": round(plan.summary().ideal_speedup, 3),
            "psnr_db": round(psnr, 2) if np.isfinite(psnr) else None,
        }
        if min(full.shape[1:3]) >= metrics.SSIM_TAPS:
            result["ssim"] = round(float(metrics.ssim(fast, full)), 4)
        return {"metrics": result, "full": full, "cached": fast}


def _log(message: str) -> None:
    """A line in this worker's log (Ray keeps a worker's stderr in its session's logs)."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    print(f"{stamp} invardiff worker {os.getpid()}: {message}", file=sys.stderr, flush=True)


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (benchmarks): this process
        return "local"


def remote_worker(resources: dict[str, float]):
    """The Ray actor class asking for ``resources`` (``workers.pool.worker_resources``)."""
    import ray

    return ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=0, **resources)(CalibrationWorker)
