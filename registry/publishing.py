"""Publishing: plan bytes stored in the object store and registered as a version of their target."""

from __future__ import annotations

import random
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from invardiff.plan import FORMAT_VERSION

from . import leases
from .errors import Conflict, InvalidInput, RegistryError
from .faults import crash_point
from .indexing import Indexed
from .intake import as_dict, load_plan, plan_target_key
from .matching import FAILED_GATE, READY, ModelInfo, Resolution, TargetKey, VersionInfo
from .models import CalibrationJob, PlanTarget, PlanVersion
from .rows import version_info
from .store import BlobRef, blob_ref, put_blob
from .validation import read_plan_file

PUBLISH_ATTEMPTS = 10


@dataclass(frozen=True)
class PublishResult:
    """What ``publish`` did: ``created`` is False when the same bytes were already there."""

    created: bool
    model: str
    target: TargetKey
    version: VersionInfo

    def to_json(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "model": self.model,
            "target": self.target.to_json(),
            **self.version.to_json(),
        }


class Publisher(Indexed):
    """Publishing plans."""

    def publish(
        self,
        path: str | Path,
        model_name: str,
        resolution: Resolution | None,
        steps: int | None = None,
        status: str = READY,
    ) -> PublishResult:
        """Publish a plan file (read bounded, see :func:`registry.validation.read_plan_file`);
        see :meth:`publish_bytes`."""
        model = self._model_for(model_name, status)
        path = Path(path)
        return self._publish(read_plan_file(path), path, model, resolution, steps, status)

    def publish_bytes(
        self,
        data: bytes,
        name: str,
        model_name: str,
        resolution: Resolution | None,
        steps: int | None = None,
        status: str = READY,
    ) -> PublishResult:
        """Store a plan's bytes and register them as a version of its target; ``name`` is the
        plan's file name in its lineage and in errors.

        ``status`` is ``ready``, or ``failed_gate`` for a plan below its quality gate: recorded
        with its metrics, never served (not ``latest``, not an alias, not in the index).
        Idempotent: the same bytes for the same target give the existing version (whose status
        stays as it is). Concurrent
        publishers race on the database's unique constraints and retry a bounded number of times.
        A lease keeps gc off the object from before it is written until the version that
        references it commits (see :mod:`registry.leases`); a damaged copy already in the
        store is replaced.
        """
        model = self._model_for(model_name, status)
        return self._publish(data, Path(name), model, resolution, steps, status)

    def _model_for(self, model_name: str, status: str) -> ModelInfo:
        if status not in (READY, FAILED_GATE):
            raise InvalidInput(f"a plan is published ready or failed_gate, not {status!r}")
        return self.model(model_name)

    def _publish(
        self,
        data: bytes,
        path: Path,
        model: ModelInfo,
        resolution: Resolution | None,
        steps: int | None,
        status: str,
    ) -> PublishResult:
        plan, lineage = load_plan(data, path, model, resolution, steps)
        data = plan.to_bytes()
        key = plan_target_key(model, plan)
        metrics = {**plan.summary().to_json(), **as_dict(plan.calibration.get("metrics"))}
        blob = blob_ref(data)
        self.store.check_writable()  # an unwritable store fails before the database changes
        lease = None
        try:
            for attempt in range(PUBLISH_ATTEMPTS):
                if lease is None:
                    lease = leases.begin_publish(self.session, blob.key)
                    crash_point("publish.leased")
                    put_blob(self.store, data)
                    crash_point("publish.stored")
                try:
                    result = self._register(model, key, blob, metrics, lineage, lease, status)
                    lease = None  # consumed by the commit
                    break
                except (IntegrityError, leases.LeaseLost) as exc:
                    if attempt == PUBLISH_ATTEMPTS - 1:
                        raise Conflict(
                            f"publishing {blob.sha256[:12]} kept conflicting; try again"
                        ) from None
                    if isinstance(exc, leases.LeaseLost):
                        lease = None  # gc took the object over: write it again
                    time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        finally:
            if lease is not None:  # failed: leave nothing behind (else it expires)
                with suppress(RegistryError):
                    leases.release(self.session, lease)
        crash_point("publish.committed")
        self.write_indexes(self.models_of(key.source))  # also heals a missed write
        return result

    def _register(
        self,
        model: ModelInfo,
        key: TargetKey,
        blob: BlobRef,
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        lease: int,
        status: str,
    ) -> PublishResult:
        with self.session() as session:
            leases.end_publish(session, blob.key, lease)
            target = session.scalar(select(PlanTarget).where(PlanTarget.key_hash == key.key_hash))
            if target is None:
                target = PlanTarget(key_hash=key.key_hash, **key.to_json())
                session.add(target)
                session.flush()
            existing = session.scalar(
                select(PlanVersion).where(
                    PlanVersion.target_id == target.id, PlanVersion.sha256 == blob.sha256
                )
            )
            if existing is not None:
                return PublishResult(False, model.name, key, version_info(existing))
            number = session.scalar(
                select(func.max(PlanVersion.version)).where(PlanVersion.target_id == target.id)
            )
            job_key = lineage["calibration"].get("job_key")
            job_id = (
                session.scalar(select(CalibrationJob.id).where(CalibrationJob.job_key == job_key))
                if isinstance(job_key, str)
                else None
            )
            row = PlanVersion(
                target_id=target.id,
                version=(number or 0) + 1,
                sha256=blob.sha256,
                size=blob.size,
                object_key=blob.key,
                format_version=FORMAT_VERSION,
                status=status,
                metrics=metrics,
                lineage=lineage,
                calibration_job_id=job_id,
            )
            session.add(row)
            session.flush()
            return PublishResult(True, model.name, key, version_info(row))

